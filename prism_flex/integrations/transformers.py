"""Hugging Face transformers integration: Prism as a registered attention implementation.

Usage::

    from prism_flex import PrismConfig
    from prism_flex.integrations.transformers import register

    name = register(PrismConfig(high_threshold=0.95, low_threshold=0.95))   # "prism"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    # or, on a loaded model: model.set_attn_implementation(name)

It uses transformers' public extension points only (no patched classes):

- ``AttentionInterface.register(name, attention_fn)``: the attention itself. transformers calls
  ``attention_fn(module, query, key, value, attention_mask, dropout=..., scaling=...,
  **kwargs)`` with query ``(B, Hq, Lq, D)`` after RoPE and key/value ``(B, Hkv, Lkv, D)``
  straight from the KV cache (not repeated for GQA: the model leaves that to the attention
  function, and Prism handles ``Hq % Hkv == 0`` natively), and expects
  ``(attn_output (B, Lq, Hq, D), attn_weights or None)``.
- ``AttentionMaskInterface.register(name, mask_fn)``: the mask the model builds for that
  implementation. Without it, transformers builds *no* mask for an unknown implementation name
  (it assumes a backend that handles padding itself), and a padded batch would be silently
  attended as unpadded. Ours returns ``None`` for a plain causal mask (no materialised
  ``(B, 1, Lq, Lkv)`` tensor, which at long context would cost more than Prism saves); for a
  padded batch (the 2-D ``attention_mask``) or packed sequences (``position_ids`` restarting
  at 0, no cache: transformers then composes a packed-sequence mask function, recognised by
  its structure) it returns int32 ``(B, 1, 1, Lkv)`` per-key document ids, ``-1`` for padding
  (``prism_flex.documents.Segments.ids``), once per forward, which every layer's attention
  then honours (no block crosses a boundary, padded query rows output zeros); it raises
  :class:`NotImplementedError` only for a sliding-window or custom mask on a cache whose keys
  outnumber the tokens seen (a StaticCache not yet full: otherwise handled, see below).
  transformers (5.x, ``masking_utils.create_causal_mask``) calls it with ``q_length``,
  ``kv_length``, ``q_offset`` (the cache's ``get_query_offset()``: tokens cached before this
  forward) and ``kv_offset`` (both from the cache's ``get_mask_sizes``), the 2-D
  ``attention_mask`` or ``None``, and the mask function. The attention function is not given
  the cache (its kwargs
  carry ``position_ids`` and ``use_cache``), so the cache checks live in the mask function.

Which PrismConfig is used: the one given to :func:`register` for that name (default
``PrismConfig()``). A call may override it with a ``prism_config=`` keyword argument to the
model's forward (transformers passes unknown forward kwargs down to the attention function);
``generate`` does not forward unknown kwargs, so for a per-model configuration register one
name per configuration (``register(cfg_a, "prism_a")``) and give each model its name.

Supported: causal self-attention of decoder-only models whose attention calls
``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Qwen3, Mistral, ...), with no cache or a dynamic KV
cache (prefill, chunked prefill continuing a cache, greedy/sampled decoding), padded batches
(``generate`` on several prompts: left padding and its 2-D ``attention_mask``; decoding steps
run dense SDPA with the same mask) and packed sequences (``position_ids`` restarting per
document, ``use_cache=False``). Not supported (raises :class:`NotImplementedError`):
sliding-window layers (the error names the layer and its type), 4-D or custom masks other
than plain causal on the sparse path (the dense path, i.e. SDPA, applies any 4-D mask), and
the sparse path inside ``torch.compile`` on a cache whose key/value tensors are longer than
the tokens seen so far (``StaticCache`` / ``cache_implementation="static"``: the written
length is a traced value there; a run-time ``torch._assert_async``). Eagerly such a cache
works (prefill and decoding: the mask function hands the attention the written keys only,
so bottom-right causality is exact), and so do compiled decoding steps on the dense path.
attention dropout, ``output_attentions``. Inference only, like :func:`prism_flex.prism_attention`.

How sparse a forward was: run it inside :func:`record_density`::

    with record_density() as rec:
        model(input_ids)
    rec.per_layer()   # [(layer, mean density), ...], one host sync here, after the forward
    rec.mean()

Each Prism attention call made while recording appends a :class:`DensityRecord` (layer, query
and key lengths, the ``(B, Hq)`` density left on the device, whether the call ran dense).
Recording is eager only: calls traced into a user's ``torch.compile`` of the model are not
recorded (appending to a Python list is a side effect a compiled graph does not replay per
call); run the forward uncompiled to measure it. Outside the context nothing changes: the
attention function does no extra work and no host sync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor
from transformers import AttentionInterface  # noqa: E402  (this module is the lazy boundary)
from transformers.masking_utils import (  # noqa: E402
    AttentionMaskInterface,
    causal_mask_function,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from ..checks import check_inputs, plainly_valid
from ..config import PrismConfig
from ..dispatch import attention_with_segments, needs_grad, takes_dense_path
from ..documents import Segments
from ..pipeline import dense_causal_sdpa

__all__ = [
    "register",
    "make_attention_function",
    "record_density",
    "DensityRecorder",
    "DensityRecord",
    "PADDING_ERROR",
    "STATIC_CACHE_ERROR",
]

PADDING_ERROR = (
    "prism attention does not support this mask: it takes no attention mask, the model's "
    "2-D attention_mask (padded batches, left or right padding) or packed sequences given "
    "by position_ids. On its sparse path (calls large enough to select blocks) a 4-D mask or a "
    "mask function other than those (a 4-D padded mask, sliding window, bidirectional or "
    "custom and/or masks) has no structure Prism can select blocks from; its dense path (SDPA) "
    "applies any 4-D mask. Workaround: pass the 2-D attention_mask (batch, seq_len) instead "
    "of a 4-D mask, or use attn_implementation='sdpa' for such masks."
)

STATIC_CACHE_ERROR = (
    "prism attention cannot run its sparse path inside torch.compile on a KV cache whose "
    "key/value tensors are longer than the tokens written so far (StaticCache, "
    "cache_implementation='static', or any pre-allocated cache): the number of written tokens "
    "is a traced value there, and Prism aligns causality bottom-right over the keys it is "
    "given. Eager forwards (prefill and decoding) and compiled decoding steps on the dense "
    "path work. Workaround: run the prefill eagerly (generate compiles only decoding steps), "
    "pass disable_compile=True to generate, use the default dynamic cache (drop "
    "cache_implementation='static'), or use attn_implementation='sdpa'."
)


def register(
    config: Optional[PrismConfig] = None, name: str = "prism", *, compiled: bool = True
) -> str:
    """Register Prism attention (and its mask function) with transformers under ``name``.

    Args:
        config: selection settings for every model using ``attn_implementation=name``;
            ``None``: ``PrismConfig()``. Registering the same name again replaces the config
            (calling it twice with the same arguments is a no-op).
        name: the ``attn_implementation`` string; must not be one of transformers' own nor
            contain "flash" (transformers would try to load it as a FlashAttention kernel).
        compiled: passed to :func:`prism_flex.prism_attention` (``False``: eager, for tests
            and debugging at small sizes).
    Returns:
        ``name``, to pass as ``attn_implementation``.
    """
    if config is None:
        config = PrismConfig()
    if not isinstance(config, PrismConfig):
        raise TypeError(f"config must be a PrismConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    # What is registered under ``name`` says whether it is ours (our functions carry their
    # settings), so no registry of our own is kept.
    current = ALL_ATTENTION_FUNCTIONS.get(name)
    ours = hasattr(current, "prism_config")
    if (current is not None and not ours) or name == "eager" or "|" in name:
        raise ValueError(
            f"{name!r} is a transformers attention implementation; choose another name"
        )
    if "flash" in name:
        # transformers reads any implementation name containing "flash" as a FlashAttention
        # kernel to load from the hub (`is_flash_attention_requested`), and set_attn_implementation
        # then fails far from here.
        raise ValueError(
            f"{name!r}: transformers treats attention names containing 'flash' as FlashAttention "
            f"kernels; choose a name without it (e.g. 'prism_fa4' for flex_backend='flash')"
        )
    if ours and (current.prism_config, current.prism_compiled) == (config, compiled):
        return name
    AttentionInterface.register(name, make_attention_function(config, compiled=compiled))
    AttentionMaskInterface.register(name, prism_mask)
    return name


def prism_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[Tensor] = None,
    local_size: Optional[int] = None,
    **kwargs,
) -> Optional[Tensor]:
    """The mask function registered for Prism (``AttentionMaskInterface``).

    ``attention_mask`` here is the model's 2-D padding mask ``(B, seen + Lq)`` (or ``None``).
    The model builds its mask once per forward, not once per layer, so the padding is read
    here: one O(B * Lkv) reduction per forward (one host sync in eager mode, to keep the plain
    path for unpadded batches) instead of a per-layer look at a 4-D mask.

    First, a cache whose keys outnumber the tokens seen (a StaticCache not yet full:
    ``kv_offset + kv_length > q_offset + q_length``, see :func:`_written_keys`): in eager
    mode the result is the int32 ids of the *written* keys only (the attention function
    drops the unwritten K/V slots, and the queries are then the last of its keys, so
    bottom-right causality is exact); while traced by ``torch.compile`` the exact mask is
    materialised (the dense path, e.g. decoding steps, applies it with SDPA; the sparse path
    refuses it with a run-time assert); with a sliding-window or custom mask it raises.

    Returns ``None`` (plain bottom-right causal, which Prism applies itself) when the mask
    function is the plain causal one and no key is padded; int32 ``(B, 1, 1, Lkv)`` document ids
    (``-1``: padding) for padded keys (one document per row) or for packed sequences
    (:func:`_packed_sequence_ids`). Any other mask (sliding window, custom ``or``/``and``
    masks) is materialised as transformers' SDPA boolean mask, which the attention function
    then checks (and rejects unless it is plain causal).
    """
    written = _written_keys(q_length, kv_length, q_offset, kv_offset)
    plain = mask_function is causal_mask_function and local_size is None
    if written is not None:
        # A StaticCache not full yet: keys past `written` are unwritten slots.
        if isinstance(written, Tensor):
            # Traced (torch.compile): the exact mask, materialised; decoding steps (the dense
            # path) honour it with SDPA, the sparse path refuses it (a run-time assert).
            if plain:
                return _materialised(
                    batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                    attention_mask, None, kwargs,
                )  # fmt: skip
        elif plain and kv_offset == 0:
            # Eager: the ids of the written keys only; the attention drops the rest of K/V,
            # and the queries are then the last of the keys it sees (bottom-right, exact).
            keys = torch.ones((batch_size, written), dtype=torch.bool)
            if attention_mask is not None:
                keys = _covering(attention_mask[:, :written].bool(), written)
            keys = keys.to(kwargs.get("device") or getattr(attention_mask, "device", "cpu"))
            ids = torch.where(keys, 0, -1).to(torch.int32)
            return _document_ids(ids, batch_size, written, num_docs=1)
        else:
            raise NotImplementedError(
                f"{STATIC_CACHE_ERROR} (This forward: {kv_offset + kv_length} key positions, "
                f"{written} tokens seen, with a sliding-window or custom mask.)"
            )
    packed = _packed_sequence_ids(mask_function)
    if packed is not None and local_size is None and attention_mask is None:
        # Packed sequences (position_ids restarting, no cache): the documents themselves.
        ids = packed.to(torch.int32)
        num, lengths = None, None
        if not torch.compiler.is_compiling():  # one host read per forward, not per layer
            if ids.shape[0] == 1:  # one row: the documents' lengths too (the ids are 0, 1, ...)
                lengths = tuple(torch.bincount(ids[0].long()).tolist())
                num = len(lengths)
            else:
                num = int(ids.max()) + 1
        return _document_ids(
            ids, batch_size, kv_length, num_docs=num, padded=False, lengths=lengths
        )
    if mask_function is not causal_mask_function or local_size is not None:
        return _materialised(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            local_size, kwargs,
        )  # fmt: skip
    if attention_mask is None:
        return None
    # The keys of this forward are positions kv_offset .. kv_offset + kv_length - 1 of the 2-D
    # mask; positions the mask does not cover (StaticCache slots not written yet) are masked.
    keys = _covering(attention_mask[:, kv_offset : kv_offset + kv_length].bool(), kv_length)
    if not torch.compiler.is_compiling() and bool(keys.all()):
        return None  # no padding: the plain causal path (one host sync per forward)
    # One document per row, -1 for padding (prism_flex.documents.Segments.ids).
    ids = torch.where(keys, 0, -1).to(torch.int32)
    return _document_ids(ids, batch_size, kv_length, num_docs=1)


def _materialised(
    batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
    local_size, kwargs,
) -> Tensor:  # fmt: skip
    """transformers' SDPA boolean mask for these arguments (never skipped as plain causal)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "allow_is_causal_skip"}  # ours wins
    if local_size is not None:
        kwargs["local_size"] = local_size
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        **kwargs,
    )


def _covering(keys: Tensor, length: int) -> Tensor:
    """``keys`` (bool ``(B, n)``) extended to ``length`` columns; keys the 2-D mask does not
    cover are padding."""
    if keys.shape[-1] == length:
        return keys
    return torch.nn.functional.pad(keys, (0, length - keys.shape[-1]))


def _document_ids(
    ids: Tensor,
    batch_size: int,
    kv_length: int,
    num_docs=None,
    padded: bool = True,
    lengths: Optional[tuple[int, ...]] = None,
) -> Tensor:
    """The mask handed to the attention function for padding/documents: int32
    ``(B, 1, 1, Lkv)``, each key's document ordinal in its row, -1 for padding.

    Why 4-D: ``generate`` with a compileable cache builds the mask once
    (``create_masks_for_generate``) and hands it back to the model's forward as
    ``attention_mask``; transformers passes a 4-D mask through as already prepared, but
    would read a 2-D one as a 0/1 padding mask. Int32 tells it from a user's 4-D mask (bool
    or additive float: SDPA takes no integer mask).

    Eagerly, the tensor also carries what this forward knows about it, for every layer to
    reuse: ``_prism_num_docs`` (documents per row, so that no layer reads the ids back from
    the device to count them), ``_prism_padded`` (False: no key is padding) and
    ``_prism_lengths`` (one row's document lengths, ``documents.Segments.lengths``)."""
    out = ids.expand(batch_size, kv_length).contiguous()[:, None, None, :]
    if not torch.compiler.is_compiling():
        out._prism_num_docs = num_docs
        out._prism_padded = padded
        out._prism_lengths = lengths if batch_size == 1 and not padded else None
    return out


def _closure_vars(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _is(fn, qualname: str) -> bool:
    return (
        getattr(fn, "__module__", None) == "transformers.masking_utils"
        and getattr(fn, "__qualname__", None) == qualname
    )


def _packed_sequence_ids(mask_function) -> Optional[Tensor]:
    """The ``packed_sequence_mask`` ``(B, L)`` (0, 1, ... per row: the document of each
    token) when ``mask_function`` is exactly what ``create_causal_mask`` builds for packed
    sequences, else ``None``: ``and_masks(causal_mask_function,
    packed_sequence_mask_function(packed_sequence_mask))`` (transformers 5.17) or the same with
    the causal part ``remap_positions_for_packed_sequence(causal_mask_function, position_ids)``
    (5.25). Both are the document-causal rule: within a document the position ids count up by
    one (that is how transformers finds the documents), so comparing them compares positions.

    Why by structure: transformers hands the mask function only that closure, and its value
    (the document-causal rule) is what Prism applies itself; any other composition (sliding
    window, custom ``and``/``or`` masks) is not recognised and goes the checked way (the
    materialised mask, rejected unless plain causal), never silently approximated.
    """
    if not _is(mask_function, "and_masks.<locals>.and_mask"):
        return None
    parts = _closure_vars(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    causal, packed = parts
    if causal is not causal_mask_function and not (
        _is(causal, "remap_positions_for_packed_sequence.<locals>.inner_mask")
        and _closure_vars(causal).get("mask_function") is causal_mask_function
    ):
        return None
    if not _is(packed, "packed_sequence_mask_function.<locals>.inner_mask"):
        return None
    ids = _closure_vars(packed).get("packed_sequence_mask")
    return ids if isinstance(ids, Tensor) and ids.dim() == 2 else None


def _written_keys(q_length, kv_length, q_offset, kv_offset):
    """``None`` when the last key of this forward is the last query's own position, else the
    number of keys written so far (an int; a 0-d tensor while traced).

    transformers sizes the mask from the cache: the keys are positions ``kv_offset ..
    kv_offset + kv_length - 1`` and the queries ``q_offset .. q_offset + q_length - 1``, where
    ``q_offset`` is the number of tokens cached before this forward. Bottom-right causality
    (what Prism applies) is right only when both end at the same position. A dynamic cache
    (``DynamicLayer.get_mask_sizes``: ``kv_length = seen + q_length``, ``kv_offset = 0``) always
    satisfies it; a ``StaticLayer`` reports ``kv_length = max_cache_len`` and breaks it until
    every slot is written. StaticLayer's ``q_offset`` is a 0-d tensor (its
    ``cumulative_length``): read once per forward in eager mode (one host sync, only for such
    caches); while traced it stays a tensor (the mask is then materialised).
    """
    seen = q_offset + q_length
    end = kv_offset + kv_length
    if isinstance(seen, Tensor):
        if torch.compiler.is_compiling():
            return seen
        seen = int(seen)
    if seen == end:
        return None
    if seen > end:
        raise NotImplementedError(
            f"prism attention: {seen} tokens seen but only {end} key positions in this forward"
        )
    return seen


def _is_4d(mask) -> bool:
    return isinstance(mask, Tensor) and mask.dim() == 4


def _dense_with_mask(query, key, value, mask, scale):
    """SDPA with a model's 4-D mask (boolean or additive), native GQA."""
    gqa = True if torch.compiler.is_compiling() else query.shape[1] != key.shape[1]
    mask = mask[:, :, :, : key.shape[2]]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa
    )


def _is_document_ids(mask) -> bool:
    """Whether the model's mask is the padding/document ids :func:`prism_mask` returns."""
    return (
        isinstance(mask, Tensor)
        and mask.dim() == 4
        and mask.dtype == torch.int32
        and mask.shape[1] == mask.shape[2] == 1
    )


def _sliding_window_error(module, window) -> str:
    layer = getattr(module, "layer_idx", None)
    kind = getattr(module, "layer_type", None) or "sliding_attention"
    config = getattr(module, "config", None)
    model = getattr(config, "model_type", None) or type(module).__name__
    return (
        f"prism attention does not support sliding-window layers: layer {layer} of this "
        f"{model} model is {kind!r} (config.layer_types) with sliding_window={window}, and "
        "Prism selects blocks for full causal attention only. Workaround: if the checkpoint "
        "does not need the window (Qwen2/Qwen2.5 ship use_sliding_window=False), load it "
        "with that setting so every layer is 'full_attention' (e.g. from_pretrained(..., "
        "use_sliding_window=False)); otherwise use attn_implementation='sdpa'."
    )


def _check_mask(mask, q_len: int, kv_len: int) -> None:
    """Raise unless ``mask`` is ``None`` or the plain bottom-right causal mask.

    Cheap by design, O(B * Lkv) instead of O(B * Lq * Lkv): it reads two rows. The last query
    row must see every key (any padded key, packed-sequence boundary or sliding window masks
    some key of it: 2-D padding masks a key for *every* row), and the first query row must see
    exactly keys ``0 .. Lkv - Lq`` (bottom-right alignment; catches top-left masks and unwritten
    StaticCache slots). A hand-made mask that differs only inside other rows is not detected.
    """
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise NotImplementedError(
            f"prism attention takes attention_mask=None or a 4-D tensor, got "
            f"{type(mask).__name__}; {PADDING_ERROR}"
        )
    if mask.dim() != 4 or mask.shape[-2] != q_len or mask.shape[-1] != kv_len:
        raise NotImplementedError(
            f"prism attention expects a (B, 1 or H, {q_len}, {kv_len}) mask, got shape "
            f"{tuple(mask.shape)}"
        )
    rows = mask[:, :, [0, q_len - 1], :]
    if rows.dtype == torch.bool:
        visible, blocked = rows, ~rows
    else:  # additive float mask: 0 where visible, a large negative number (or -inf) elsewhere
        visible = rows == 0
        blocked = rows <= torch.finfo(rows.dtype).min / 2
    want = torch.arange(kv_len, device=mask.device) <= kv_len - q_len  # first row
    want = torch.stack([want, torch.ones_like(want)])  # (2, Lkv): first and last row
    ok = torch.where(want, visible, blocked).all()
    if torch.compiler.is_compiling():
        # Traced, a StaticCache's unwritten slots arrive here too (prism_mask materialises them).
        torch._assert_async(ok, f"{PADDING_ERROR} With a StaticCache: {STATIC_CACHE_ERROR}")
        return
    if not bool(ok):
        raise NotImplementedError(PADDING_ERROR)


def make_attention_function(config: PrismConfig, *, compiled: bool = True):
    """The function registered with ``AttentionInterface`` for ``config``."""

    def prism_attention_forward(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        is_causal: Optional[bool] = None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        cfg = kwargs.get("prism_config")
        cfg = config if cfg is None else cfg
        if not isinstance(cfg, PrismConfig):
            raise TypeError(f"prism_config must be a PrismConfig, got {type(cfg).__name__}")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not is_causal:
            raise NotImplementedError("prism attention is causal only (module.is_causal=False)")
        if dropout:
            raise NotImplementedError("prism attention is inference only: attention dropout > 0")
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(_sliding_window_error(module, kwargs["sliding_window"]))
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("prism attention does not support logit softcapping")
        if kwargs.get("output_attentions", False):
            raise NotImplementedError(
                "prism attention does not return attention weights (output_attentions=True)"
            )
        if (
            attention_mask is None
            and not _RECORDERS
            and not torch.compiler.is_compiling()
            and query.shape[2] == key.shape[2]
            and plainly_valid(query, key, value)
            and cfg.runs_dense(query.shape, key.shape[2])
            and not needs_grad(query, key, value)  # that case warns, below
        ):
            # A short prompt's call (every call of a chat-length prefill): the SDPA call of
            # prism_attention's dense path without the Python in between. Such forwards are
            # bound by the host (Qwen2.5-0.5B at 4K tokens: bench/NOTES.md, rounds 9-10), and
            # there each function call costs more than on a desktop CPU, 24 times a forward.
            cfg.band_dims(query.shape[-1])  # the config errors every other call raises
            out = dense_causal_sdpa(query, key, value, scaling)
            return out.transpose(1, 2).contiguous(), None
        segments = None
        if _is_document_ids(attention_mask):
            # Padding / packed documents, from prism_mask (one tensor per forward).
            num_docs = getattr(attention_mask, "_prism_num_docs", None)
            padded = getattr(attention_mask, "_prism_padded", True)
            lengths = getattr(attention_mask, "_prism_lengths", None)
            attention_mask = attention_mask[:, 0, 0]
            written = attention_mask.shape[1]
            if attention_mask.shape[0] != query.shape[0] or not (
                query.shape[2] <= written <= key.shape[2]
            ):
                raise NotImplementedError(
                    f"prism attention: the padding/document mask has shape "
                    f"{tuple(attention_mask.shape)}, expected (batch, written keys) with "
                    f"batch {query.shape[0]} and {query.shape[2]} <= written <= {key.shape[2]}"
                )
            if written < key.shape[2]:
                # A StaticCache: only the written keys (prism_mask, eager).
                key = key[:, :, : attention_mask.shape[1]]
                value = value[:, :, : attention_mask.shape[1]]
                lengths = None
            segments = Segments(attention_mask, num_docs, padded, lengths)
        elif _is_4d(attention_mask) and takes_dense_path(query, key, value, cfg):
            # The dense path is SDPA: any mask is exact there (a compiled StaticCache decode
            # step, a user's 4-D mask).
            check_inputs(query, key, value)
            out = _dense_with_mask(query, key, value, attention_mask, scaling)
            if recorders := _active_recorders():
                ones = torch.ones(query.shape[:2], device=query.device)
                for recorder in recorders:
                    recorder._add(module, query.shape[2], key.shape[2], ones, True)
            return out.transpose(1, 2).contiguous(), None
        else:
            _check_mask(attention_mask, query.shape[2], key.shape[2])
        check_inputs(query, key, value)
        cfg.band_dims(query.shape[-1])
        recorders = _active_recorders()
        # K/V keep their Hkv heads: prism_attention does GQA natively (no repeat_kv).
        # The density only while recording (the dense path's host time: bench/NOTES.md).
        out = attention_with_segments(
            query, key, value, cfg, scaling, bool(recorders), compiled, segments
        )
        if recorders:
            out, density = out
            dense, density = takes_dense_path(query, key, value, cfg), density.detach()
            for recorder in recorders:
                recorder._add(module, query.shape[2], key.shape[2], density, dense)
        return out.transpose(1, 2).contiguous(), None

    prism_attention_forward.prism_config = config
    prism_attention_forward.prism_compiled = compiled
    return prism_attention_forward


@dataclass(frozen=True, eq=False)  # eq by identity: fields hold a tensor
class DensityRecord:
    """One Prism attention call made while :func:`record_density` was active.

    Attributes:
        layer: ``module.layer_idx`` of the attention module, or, for modules without one, the
            number of calls this recorder had seen before (its call counter).
        q_len: query length of the call (``Lq``; 1 for a decoding step).
        kv_len: key length (``Lkv``: cached tokens plus ``Lq``).
        density: float32 ``(B, Hq)`` on the call's device: selected / causally visible blocks.
        dense: the call ran dense attention (below the config's size floor, or inputs that
            require grad); its density is 1.0.
    """

    layer: int
    q_len: int
    kv_len: int
    density: Tensor
    dense: bool


class DensityRecorder:
    """Collects a :class:`DensityRecord` per Prism attention call; made by :func:`record_density`.

    ``records`` holds them in call order: one per layer per forward (a ``generate`` adds one
    per layer per decoding step too; filter on ``q_len`` for the prefill). The densities stay
    on the device while the model runs; :meth:`per_layer` and :meth:`mean` read them back.
    """

    def __init__(self) -> None:
        self.records: list[DensityRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def clear(self) -> None:
        """Drop the records (e.g. between the forwards of one context)."""
        self.records.clear()

    def per_layer(self) -> list[tuple[int, float]]:
        """``[(layer, mean density), ...]`` sorted by layer; ``[]`` when nothing was recorded.

        Each layer's value is the mean over its records of the record's mean over ``(B, Hq)``.
        One host sync (call it after the forward, not inside it).
        """
        means = self._record_means()
        by_layer: dict[int, list[float]] = {}
        for record, value in zip(self.records, means):
            by_layer.setdefault(record.layer, []).append(value)
        return [(layer, sum(v) / len(v)) for layer, v in sorted(by_layer.items())]

    def mean(self) -> float:
        """Mean density over all records (each call's ``(B, Hq)`` mean weighted equally).

        One host sync. Raises ``ValueError`` when nothing was recorded.
        """
        means = self._record_means()
        if not means:
            raise ValueError(
                "no density recorded: run the model's forward inside `with record_density()`, "
                "with attn_implementation set to a name from register(), and uncompiled "
                "(calls inside torch.compile are not recorded)"
            )
        return sum(means) / len(means)

    def _record_means(self) -> list[float]:
        if not self.records:
            return []
        device = self.records[0].density.device
        # One stack and one .tolist(): a single host sync instead of one per record (records
        # of a model split over devices are first gathered on the first record's device).
        stacked = torch.stack([r.density.float().mean().to(device) for r in self.records])
        return stacked.tolist()

    def _add(self, module, q_len: int, kv_len: int, density: Tensor, dense: bool) -> None:
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            layer = len(self.records)
        self.records.append(DensityRecord(layer, q_len, kv_len, density, dense))


# The recorders of the open record_density() contexts, innermost last. Module-level and not
# thread-local: one Python thread drives a model's forward, and the integration is inference
# only, so a forward on another thread while recording is not a case to support. Every open
# recorder gets each record, so an inner context does not hide calls from an outer one.
_RECORDERS: list[DensityRecorder] = []


@contextlib.contextmanager
def record_density() -> Iterator[DensityRecorder]:
    """Record the block density of every Prism attention call made inside the ``with``.

    Yields a :class:`DensityRecorder`; its records stay readable after the ``with``. Eager
    only: calls traced into ``torch.compile`` are not recorded (see the module docstring).
    """
    recorder = DensityRecorder()
    _RECORDERS.append(recorder)
    try:
        yield recorder
    finally:
        _RECORDERS.remove(recorder)


def _active_recorders() -> list[DensityRecorder]:
    """The open recorders, or ``[]`` while tracing (a compiled graph does not record)."""
    # is_compiling() first: under dynamo it folds to True and the global list is never read,
    # so opening or closing a recorder does not invalidate a user's compiled model.
    if torch.compiler.is_compiling():
        return []
    return _RECORDERS
