"""Prism attention on one long synthetic input, against dense causal attention.

The input is *synthetic*: post-RoPE queries/keys/values built by :func:`synthetic_qkv` below
with the kinds of structure that long-context attention shows in trained LLMs, so that the
block selection has something to find:

* locality: queries and keys carry a content vector that drifts slowly along the sequence,
  so ``q_i . k_j`` is largest for nearby ``j`` (the local-window / diagonal pattern);
* salient tokens: the first token (an attention sink) and a few spans of tokens at random
  places, whose keys align with every query in the low-frequency pairs, which barely
  rotate, so they are attended from any distance ("vertical" pattern);
* plus a random part in every logit, and far-away content that matches by chance: a
  background that the selection has to leave out.

It is not real model data: the density and error printed here describe this generator. To
judge accuracy, run Prism on a trained model (see ``examples/custom_model.py`` for the
integration).

Run:
    python examples/demo.py                                  # CPU, 8192 tokens
    python examples/demo.py --device cuda --length 131072    # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import Tensor

from prism_flex import PrismConfig, dense_causal_attention, prism_attention


def rope(x: Tensor, base: float) -> Tensor:
    """Rotate-half RoPE (Llama/Qwen layout: pair i = dims i, i + D/2) at positions 0..L-1.

    x: ``(B, H, L, D)``, float32.
    """
    length, d = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    angles = torch.arange(length, device=x.device, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angles.cos().float(), angles.sin().float()  # (L, D/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def synthetic_qkv(
    length: int,
    *,
    batch: int = 1,
    q_heads: int = 14,
    kv_heads: int = 2,
    head_dim: int = 64,
    rope_base: float = 1e6,
    locality: float = 12.0,
    window: int = 1024,
    sink: float = 12.0,
    spans: int = 4,
    span_len: int = 256,
    span_strength: float = 4.0,
    noise: float = 0.5,
    seed: int = 0,
    device="cpu",
    dtype=torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic post-RoPE q ``(B, Hq, L, D)``, k and v ``(B, Hkv, L, D)``; see the module doc.

    Built in float32 before RoPE, then RoPE, then cast to ``dtype``. Knobs, in units of the
    logit ``q . k / sqrt(D)``, roughly:

    * ``locality``: keys and queries carry a content vector that drifts slowly along the
      sequence (a moving average of white noise over ``window`` tokens), shared by the query
      heads of a KV group: ``q_i . k_j`` gets up to ``locality`` for ``j`` close to ``i``,
      fading over ``window`` tokens (RoPE makes the fast pairs fade sooner);
    * ``sink``: extra logit of the first token for every query (attention sink);
    * ``spans`` spans of ``span_len`` tokens at random places get ``span_strength`` extra
      logit for every query, at any distance (the "salient" content);
    * ``noise``: standard deviation of an independent random part of each logit.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    group = q_heads // kv_heads
    half = head_dim // 2
    lf_pairs = max(1, head_dim // 16)  # the slowest 1/8 of the RoPE pairs (< 1 rad over 128K)
    root_d = head_dim**0.5

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    # Slowly drifting content: box filter of white noise, unit variance per dim.
    white = randn(batch, kv_heads, length + window, head_dim).double().cumsum(dim=2)
    content = ((white[:, :, window:] - white[:, :, :-window]) / window**0.5).float()
    content = content * (locality / root_d) ** 0.5  # content_i . content_i / sqrt(D) ~ locality

    # A direction in the slowest pairs (almost no rotation): every query carries it, only the
    # sink and the salient keys share it, so they are attended at any distance.
    lf = torch.cat(
        [torch.arange(half - lf_pairs, half), torch.arange(head_dim - lf_pairs, head_dim)]
    )
    nu = torch.zeros(batch, kv_heads, 1, head_dim, device=device)
    nu[..., lf.to(device)] = randn(batch, kv_heads, 1, 2 * lf_pairs)
    nu = nu / nu.norm(dim=-1, keepdim=True) * root_d**0.5  # nu . nu / sqrt(D) = 1

    # Content and noise live in the other dims only, so that the salience channel is clean.
    other = torch.ones(head_dim, device=device)
    other[lf.to(device)] = 0.0
    noise_scale = noise**0.5  # independent q and k parts: their logit has std ~``noise``
    k = content + randn(batch, kv_heads, length, head_dim) * noise_scale
    q = (
        content.repeat_interleave(group, dim=1)
        + randn(batch, q_heads, length, head_dim) * noise_scale
    )
    k, q = k * other, q * other + nu.repeat_interleave(group, dim=1)
    k[:, :, 0] += sink * nu[:, :, 0]
    starts = torch.randint(1, max(2, length - span_len), (spans,), generator=gen).tolist()
    for s in starts:
        k[:, :, s : s + span_len] += span_strength * nu
    v = randn(batch, kv_heads, length, head_dim)
    q, k = rope(q, rope_base), rope(k, rope_base)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 1):
    """``(result, first-call seconds, mean seconds of ``repeats`` further calls)``."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return out, first, (time.perf_counter() - t0) / repeats


#: Query rows compared with the float64 reference (the last ones: they see every key).
TAIL = 256


def relative_error(x: Tensor, exact: Tensor) -> float:
    """Frobenius-norm relative error of ``x`` against the float64 ``exact``."""
    return ((x.double() - exact).norm() / exact.norm()).item()


def config_changes(config: PrismConfig) -> dict:
    """The fields of ``config`` that differ from ``PrismConfig()``, by name."""
    default = PrismConfig()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(default, f.name)
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--threshold", type=float, default=0.95, help="top-p of both bands")
    p.add_argument("--q-heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed calls (CPU 1, CUDA 10)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = a.repeats or (10 if device.type == "cuda" else 1)
    # sparse_min_flops=0: the demo shows the selection at any length (by default, calls this
    # small run dense attention: PrismConfig.runs_dense).
    config = PrismConfig(high_threshold=a.threshold, low_threshold=a.threshold, sparse_min_flops=0)
    q, k, v = synthetic_qkv(
        a.length,
        q_heads=a.q_heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        seed=a.seed,
        device=device,
        dtype=dtype,
    )
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"length {a.length}: q {tuple(q.shape)}, k/v {tuple(k.shape)}, {dtype} (synthetic)")
    print("config (PrismConfig, the fields that differ from the defaults):")
    for name, value in config_changes(config).items():
        print(f"  {name} = {value!r}")
    print(
        "\nfirst Prism call: compiling the selection and the FlexAttention kernel "
        f"({'about a minute on CPU' if device.type == 'cpu' else 'some seconds'})...",
        flush=True,
    )

    with torch.no_grad():
        # First call: compiles (scoring, selection and the FlexAttention kernel), then timed.
        (out, density), t_first, t_prism = timed(
            lambda: prism_attention(q, k, v, config, return_density=True), device, repeats
        )
        ref, t_first_ref, t_dense = timed(lambda: dense_causal_attention(q, k, v), device, repeats)

        print(
            f"done; timing dense attention, then the float64 reference of the last {TAIL} queries",
            flush=True,
        )
        # Exact attention of the last TAIL queries (bottom-right aligned), in float64.
        exact = dense_causal_attention(q[:, :, -TAIL:].double(), k.double(), v.double())
    err = relative_error(out[:, :, -TAIL:], exact)
    err_dense = relative_error(ref[:, :, -TAIL:], exact)
    per_head = density.float().mean(0)
    print(
        f"\nblock density: mean {per_head.mean():.3f} "
        f"(per head min {per_head.min():.3f}, max {per_head.max():.3f})"
    )
    print(f"relative error against exact float64 attention (last {TAIL} queries):")
    print(f"  prism {err:.2e}: the blocks it leaves out, plus rounding")
    print(
        f"  dense SDPA in {str(dtype).replace('torch.', '')} {err_dense:.2e}: the input dtype's "
        "own rounding, for scale"
    )
    print(f"prism: {t_prism * 1e3:.1f} ms (first call, with compilation: {t_first:.1f} s)")
    print(f"dense causal SDPA: {t_dense * 1e3:.1f} ms (first call {t_first_ref:.2f} s)")
    print(f"speed-up: {t_dense / t_prism:.2f}x")


if __name__ == "__main__":
    main()
