"""The checks every public entry runs on its inputs: layout, shapes, dtypes, devices and the
config's type. Host-side only (no tensor is read)."""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .config import PrismConfig

__all__ = ["MAX_HEADS", "check_inputs", "plainly_valid", "check_config", "check_flex_backend"]

#: Largest head count taken (the largest public models have 128 query heads). Why a limit:
#: a tensor in the (B, L, H, D) layout of FlashAttention has the sequence where the heads
#: belong, and passes every other check when Hq == Hkv; its "head count" is then a length.
MAX_HEADS = 1024

_LAYOUT_HINT = (
    "prism_flex takes the (batch, heads, seq_len, head_dim) layout of "
    "F.scaled_dot_product_attention; for (batch, seq_len, heads, head_dim) tensors (the "
    "FlashAttention layout) pass q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)"
)


def check_inputs(q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> None:
    """Raise ``TypeError``/``ValueError`` for inputs the attention cannot take.

    Expected: q ``(B, Hq, Lq, D)``, k and v ``(B, Hkv, Lkv, D)``, one floating dtype and one
    device, ``Hq % Hkv == 0``, ``1 <= Hq <= MAX_HEADS``, ``1 <= Lq <= Lkv``, ``D`` even.
    NaN and Inf are not looked for (that would synchronise with the GPU): they propagate as
    in SDPA.
    """
    if plainly_valid(q, k, v):
        return
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seq_len, head_dim), got shape "
                f"{tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must have the same dtype, got {q.dtype} and {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"q and {name} must be on the same device, got {q.device} and {t.device}"
            )
    bq, hq, lq, d = q.shape
    bk, hkv, lkv, dk = k.shape
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    if max(hq, hkv) > MAX_HEADS:
        raise ValueError(
            f"{shapes}: more than {MAX_HEADS} heads, which looks like a sequence length in "
            f"the heads dim. {_LAYOUT_HINT}"
        )
    if bk != bq:
        raise ValueError(f"q and k must have the same batch size, got {bq} and {bk}")
    if dk != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {dk}")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"{shapes}: the number of query heads ({hq}) must be a multiple of the number of "
            f"key/value heads ({hkv}). {_LAYOUT_HINT}"
        )
    if lq == 0 or lkv == 0 or bq == 0:
        raise ValueError(f"empty input: batch={bq}, q_len={lq}, kv_len={lkv}")
    if lq > lkv:
        raise ValueError(
            f"{shapes}: q_len ({lq}) must not exceed kv_len ({lkv}): queries are the last "
            f"q_len positions of the key sequence (bottom-right causal alignment). If the "
            f"heads are in dim 2: {_LAYOUT_HINT}"
        )
    if d % 2:
        raise ValueError(f"head_dim must be even (RoPE pairs), got {d}")


def plainly_valid(q, k, v) -> bool:
    """The common case of :func:`check_inputs` in one expression, building no message: it is
    on the path of every attention call, and short prefills are host-bound (bench/NOTES.md,
    ninth round). ``False`` sends the inputs through the detailed checks, which raise."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor)):
        return False
    if v is not None and not (isinstance(v, Tensor) and v.shape == k.shape):
        return False
    qs, ks, dtype, device = q.shape, k.shape, q.dtype, q.device
    return (
        len(qs) == 4
        and len(ks) == 4
        and q.is_floating_point()
        and k.dtype == dtype
        and k.device == device
        and (v is None or (v.dtype == dtype and v.device == device))
        and qs[0] == ks[0] > 0
        and qs[3] == ks[3]
        and qs[3] % 2 == 0
        and 0 < ks[1] <= qs[1] <= MAX_HEADS
        and qs[1] % ks[1] == 0
        and 0 < qs[2] <= ks[2]
    )


def check_config(config) -> None:
    if not isinstance(config, PrismConfig):
        raise TypeError(f"config must be a PrismConfig, got {type(config).__name__}")


def check_flex_backend(config: PrismConfig, device: torch.device, compiled: bool) -> None:
    """Raise where ``config.flex_backend`` cannot run on ``device``: ``"flash"`` needs the
    compiled path, a CUDA GPU of compute capability >= 9.0 and the flash-attn-4 and
    nvidia-cutlass-dsl packages. (No silent fallback: a user who asked for FlashAttention-4
    and got Triton would time the wrong kernel.)"""
    if config.flex_backend != "flash":
        return
    if not compiled:
        raise ValueError(
            "PrismConfig(flex_backend='flash') runs through the compiled FlexAttention only: "
            "call with compiled=True or use flex_backend='triton'"
        )
    if device.type != "cuda" or _capability(device) < (9, 0):
        raise ValueError(
            f"PrismConfig(flex_backend='flash') needs a CUDA GPU of compute capability 9.0 or "
            f"newer (Hopper, Blackwell); the inputs are on {device}"
            + (f" (capability {_capability(device)})" if device.type == "cuda" else "")
            + ": use flex_backend='triton'"
        )
    missing = _missing_modules()
    if missing:
        raise ImportError(
            f"PrismConfig(flex_backend='flash') needs FlashAttention-4 and CuTe-DSL (missing "
            f'modules: {", ".join(missing)}): pip install "prism_flex[flash]", or use '
            f"flex_backend='triton'"
        )


@functools.lru_cache(maxsize=None)
def _missing_modules() -> list[str]:
    return [m for m in ("flash_attn", "cutlass") if importlib.util.find_spec(m) is None]


@functools.lru_cache(maxsize=None)
def _capability_at(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_at(device.index if device.index is not None else torch.cuda.current_device())
