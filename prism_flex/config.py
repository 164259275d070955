"""PrismConfig: every knob of the Prism selection, validated once at construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["PrismConfig", "PRESETS", "ROPE_LAYOUTS", "FLEX_BACKENDS", "causal_attention_flops"]

#: Supported RoPE layouts of the inputs.
#: ``"half"``: rotate-half (Llama, Qwen, Mistral): pair ``i`` is dims ``(i, i + D/2)``.
#: ``"interleaved"``: GPT-J / GPT-NeoX-interleaved: pair ``i`` is dims ``(2i, 2i + 1)``.
ROPE_LAYOUTS = ("half", "interleaved")
#: FlexAttention kernels the sparse attention can run on (``PrismConfig.flex_backend``).
FLEX_BACKENDS = ("triton", "flash")

# Default band widths as fractions of the head dim (64 and 96 of a 128-wide head), as integer
# ratios: a module-level float read inside a compiled stage becomes a symbolic float under
# torch.compile(dynamic=True), and specialising it later restarted the whole trace (one more
# dynamo pass of every stage at the first call; bench/NOTES.md, tenth round).
_HIGH_FRACTION = (1, 2)
_LOW_FRACTION = (3, 4)


def _even_fraction(head_dim: int, fraction: tuple[int, int]) -> int:
    """``num / den * head_dim`` (``fraction = (num, den)``) rounded half-up to an even number
    of dims, at least one pair; integer arithmetic: ``floor(x / 2 + 1/2)`` with ``x = num *
    head_dim / den`` is ``(num * head_dim + den) // (2 * den)``."""
    num, den = fraction
    return max(2, 2 * ((num * head_dim + den) // (2 * den)))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


#: Named points of the accuracy/speed frontier (:meth:`PrismConfig.preset`): field overrides
#: of the default config, chosen on the measured frontier (docs/accuracy.md, "The frontier":
#: Qwen2.5-Coder-0.5B end to end on the H100; at 32K perplexity +1.0 % / +1.8 % / +3.3 % over
#: dense and 1.38x / 1.49x / 1.60x faster than cuDNN SDPA; at 128K with YaRN +0.3 % / +0.8 % /
#: +2.0 % and 2.70x / 3.19x / 3.68x).
PRESETS = {
    "accurate": {},
    "balanced": {"high_threshold": 0.9, "low_threshold": 0.9},
    "fast": {"high_threshold": 0.8, "low_threshold": 0.8},
}


def causal_attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """FLOPs of a dense causal attention forward, bottom-right aligned: ``4 * B * Hq * D``
    (two matrix products, a multiply and an add each) per visible (query, key) pair."""
    pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2
    return 4 * batch * heads * head_dim * pairs


@dataclass(frozen=True)
class PrismConfig:
    """Configuration of Prism block selection.

    Attributes:
        block_size: tokens per block, for both the selection and the FlexAttention
            ``BlockMask`` (one value for queries and keys). Multiple of 16; 128 is what the
            method and the GPU kernels were tuned for.
        high_band_dims: number of head dims (two per RoPE pair) in the high-frequency band.
            ``None``: half the head dim, rounded to even (64 of 128, 32 of 64).
        low_band_dims: number of head dims in the low-frequency band. ``None``: three
            quarters of the head dim, rounded to even (96 of 128, 48 of 64). Bands may overlap.
        high_threshold, low_threshold: top-p mass kept per query block in each band, in
            ``(0, 1]``. ``1.0`` keeps every causally visible block (dense attention).
        calibrate: energy-based temperature per (batch, head, band). When ``False`` the band
            logits are divided by ``sqrt(d_band) * <band>_temperature`` instead.
        high_temperature, low_temperature: fixed temperatures used when ``calibrate`` is off.
        force_sink: always select key block 0.
        force_diagonal: always select the key block(s) holding the causal diagonal of each
            query block. Turning this off can leave a query token with no visible key; its
            output is then 0 (FlexAttention's convention for fully masked rows).
        dense_final_blocks: the last ``dense_final_blocks`` query blocks of each call attend
            to every causally visible key block, whatever the scores say. In a prompt the last
            block holds the question or instruction, whose link to a fact far back (a pass key,
            a name) is what block pooling loses most easily; one dense block row costs
            at most ``2 / (Nq + 1)`` of the causal block pairs. Measured on Qwen2.5-Coder-0.5B
            (README, pass key at 10 depths, H200): with 1, Prism at threshold 0.95 retrieved
            10/10 at 4K-32K tokens where plain Prism missed up to 2 of 10, for +0.006 block
            density at 32K and +0.034 at 4K. ``final_block_pool`` (the default) gets the same
            10/10 for +0.000-0.002; ``0`` (default) is off.
        final_block_pool: the last query block also keeps the top-p (the larger band
            threshold) of a finer scoring: its queries and all keys mean-pooled over
            ``final_block_pool`` tokens, a causal softmax per query sub-block (scale
            ``1/sqrt(D)``, all head dims), summed per key block and averaged over the
            sub-blocks. A short fact (a pass key) stays visible where a 128-token key mean
            dilutes it, at ``(block_size / p) x (Lkv / p) x D`` products per head (1/256 of the
            row's exact ``Q Kᵀ`` at ``p = 16``). Must divide ``block_size``; ``0`` turns it
            off (with ``dense_final_blocks=0``: the method of the paper). Default 16, measured
            on Qwen2.5-Coder-0.5B (README): pass keys 10/10 at 4K-32K tokens at threshold 0.95
            (and at 8K-32K at 0.9; plain Prism 8-9/10 at 8K-32K), block density +0.000-0.002
            over plain Prism, perplexity equal to plain Prism's (43.44 at 32K, 0.95);
            selection time on the H200 (Llama shape) +0.12 ms GPU at 32K, +0.33 ms at 128K.
        local_blocks: every query block also keeps the ``local_blocks`` key blocks right
            before its diagonal block(s) (full blocks). Why: the first tokens of a query
            block have almost no context inside it, and their nearest context is the end of
            the previous block, which block-mean scoring underrates (one block mean against
            another: the local attention of a few tokens is a small part of it). Measured on
            Qwen2.5-Coder-0.5B (README, CPU, float32): with 1, perplexity 42.26 at density
            0.404 against 45.97 at 0.391 without (4K tokens, threshold 0.9; dense 42.09),
            42.11 at 0.287 against 45.49 at 0.282 (8K; dense 41.87), better than the
            XAttention-style estimator without that block at equal density (given the same
            block, it gains as much: 42.37 at 0.412 at 4K); it also fixed the threshold
            fit's pass-key miss at 16K. ``0``: the paper's method. Default 1.
        output_error: ``None`` (default): the top-p thresholds are ``high_threshold`` and
            ``low_threshold``. A number in ``(0, 1]``: they are fitted per (batch, head)
            instead, from the attention itself: the threshold of both bands is the smallest
            of ``prism_flex.fit.FIT_THRESHOLDS``
            for which the attention output of a few sampled query tokens over the blocks it
            selects is within this relative error (Frobenius norm) of their exact output;
            ``high_threshold`` and ``low_threshold`` then only set ``final_block_pool``'s row
            (their maximum, as without the fit). Needs ``v``. Why:
            how many blocks a row needs is what a fixed top-p gets wrong per head (the
            calibrated block softmax is sharper or flatter than the true block distribution
            by a head-dependent amount), not which ones (bench/NOTES.md). Cost: the exact
            attention of ``fit_query_blocks x fit_tokens`` queries per head, in one
            FlexAttention call (``prism_flex/fit.py``). Measured (README, H200): on
            Qwen2.5-Coder-0.5B at 32K tokens, ``0.1`` gives perplexity 44.13 at density 0.166
            (default Prism at threshold 0.9: 45.38 at 0.165; the XAttention-style estimator
            44.21 at 0.174), pass keys 10/10 at 8K and 32K but 9/10 at 16K (all without
            ``local_blocks``; with it, 10/10 at 16K on CPU); selection time (Llama shape)
            +1.2-3.7 ms GPU and ~+3 ms host per call at 8K-128K. Off by default: the host
            time, and with ``local_blocks=1`` the plain default is as good on CPU (README).
        fit_query_blocks: query blocks sampled by the fit, evenly spaced from a quarter of
            the query blocks to the last one (``output_error`` only).
        fit_tokens: query tokens per sampled block, evenly spaced in it; a multiple of 16
            (the kernel's smallest query tile), at most ``block_size`` (checked when
            ``output_error`` is set).
        rope_layout: how the RoPE pairs are laid out in the head dim, one of ``ROPE_LAYOUTS``.
        dense_below: query lengths below this use dense causal attention (decoding, short
            prefill chunks), where selection cannot pay for itself. ``0``: no such floor.
        sparse_min_flops: calls whose dense causal attention costs fewer FLOPs than this per
            row (:func:`causal_attention_flops`: ``4 * Hq * D`` per visible query-key pair)
            run dense attention (plain SDPA): Prism's selection has a cost of its own
            (host time, pooling, scoring) that a small attention cannot repay. The rule is
            :meth:`runs_dense`; work rather than a length, because the saving grows with
            heads x head dim x length^2. Default 6e11, from the H200 (torch 2.11, one run
            each, README, bench/results/h200_ttft.json): Qwen2.5-Coder-0.5B end to end,
            always-sparse Prism was 27 % slower than cuDNN at 8K tokens (1.2e11 FLOPs per
            layer) and 11 % faster at 16K (4.8e11); the Llama-3.1-8B attention shape broke
            even at 8K (5.5e11: 1.02 vs 1.00 ms) and was 3.9x faster at 32K. With 6e11 no
            measured call selects where selecting was slower (it gives up Qwen's 11 % at
            16K); the dense path itself is discussed in bench/NOTES.md (4K). ``0``: always
            select.
        max_score_elements: upper bound on the number of block scores (batch x query heads
            x query blocks x key blocks) materialised at once; longer inputs are scored in
            chunks of query blocks, which bounds the scoring memory: ~65-80 bytes per score
            (H200, Llama shape at 1M tokens: 3.9 / 2.1 / 1.2 GiB for 2**26 / 2**25 / 2**24,
            the last 6 % slower, without ``final_block_pool``, which adds ~0.16 GiB;
            bench/results/h200_tune.json, h200_attention.json). The default 2**25 still scores
            Llama-8B's 32 heads at 128K tokens in one piece (one compiled graph, no chunks).
        relative_cut: ``None`` (default): each band keeps its top-p (``high_threshold``,
            ``low_threshold``). A number ``alpha`` in ``[0, 1]``: each band keeps, sort-free,
            the blocks whose block-softmax probability is at least ``alpha`` times the
            row's largest (the same dual-band calibrated scores; the cut of FlashPrefill,
            arXiv 2603.06199, on Prism's scores). Why: top-p keeps a row's long tail of
            small blocks, which grows with the length; a cut relative to the row's maximum
            does not, and needs no sort. ``0`` keeps every visible block (dense), ``1`` only
            each row's most probable block(s). The band thresholds then only set
            ``final_block_pool``'s row (top-p at their maximum, as without the cut); the
            forced blocks (sink, diagonal, local, dense final rows) are unchanged. Not
            combinable with ``output_error`` (which fits top-p thresholds). Measured against
            top-p end to end (docs/accuracy.md, "The frontier"): on its curve at 32K, below
            it at 64K and 128K (more perplexity at equal time), hence off by default.
        flex_backend: the FlexAttention kernel of the sparse attention, one of
            ``FLEX_BACKENDS``. ``"triton"`` (default): FlexAttention's Triton kernel, on
            every device. ``"flash"``: FlashAttention-4 through CuTe-DSL
            (``kernel_options={"BACKEND": "FLASH"}``); needs a CUDA GPU of compute
            capability 9.0 or newer (Hopper, Blackwell) and the ``flash`` extra
            (``pip install "prism_flex[flash]"``: flash-attn-4, nvidia-cutlass-dsl); a call
            that cannot run it raises. Same masks, same outputs within bf16 rounding (H100,
            4K tokens: the same max error against float64 as Triton's); H100, Prism's masks:
            1.53x / 1.68x faster than Triton at 32K / 128K (Llama-8B heads), 1.28x / 1.39x
            (Qwen2.5-0.5B heads), but 1.6x / 4.5x slower at 8K (Llama / Qwen heads), and its
            first compile takes ~5 s more (bench/results/h100_flash_backend.json). Not the
            default: FlexAttention marks it experimental in torch 2.11, and it is an extra
            dependency. Padded calls, packed rows of short documents (the windowed selection)
            and the context-parallel path keep the Triton kernel (their ``mask_mod`` reads
            tables that the FLASH code generation of torch 2.11 rejects or runs slowly);
            packed rows of long documents run each document on the chosen kernel.

    Presets: :meth:`preset` names points of the measured accuracy/speed frontier
    (``"accurate"``, ``"balanced"``, ``"fast"``; :data:`PRESETS`).
    """

    block_size: int = 128
    high_band_dims: Optional[int] = None
    low_band_dims: Optional[int] = None
    high_threshold: float = 0.95
    low_threshold: float = 0.95
    calibrate: bool = True
    high_temperature: float = 1.0
    low_temperature: float = 1.0
    force_sink: bool = True
    force_diagonal: bool = True
    dense_final_blocks: int = 0
    final_block_pool: int = 16
    local_blocks: int = 1
    output_error: Optional[float] = None
    fit_query_blocks: int = 4
    fit_tokens: int = 32
    rope_layout: str = "half"
    dense_below: int = 1024
    sparse_min_flops: float = 6e11
    max_score_elements: int = 1 << 25
    relative_cut: Optional[float] = None
    flex_backend: str = "triton"

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or self.block_size < 16 or self.block_size % 16:
            raise ValueError(
                f"PrismConfig.block_size must be a positive multiple of 16, got {self.block_size!r}"
            )
        for name in ("high_band_dims", "low_band_dims"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 2 or value % 2):
                raise ValueError(
                    f"PrismConfig.{name} must be None or an even int >= 2 (two dims per RoPE "
                    f"pair), got {value!r}"
                )
        for name in ("high_threshold", "low_threshold"):
            value = getattr(self, name)
            if not _is_real(value) or not (0.0 < value <= 1.0):
                raise ValueError(f"PrismConfig.{name} must be a number in (0, 1], got {value!r}")
        for name in ("high_temperature", "low_temperature"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"PrismConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("calibrate", "force_sink", "force_diagonal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PrismConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(
                f"PrismConfig.rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}"
            )
        if self.flex_backend not in FLEX_BACKENDS:
            raise ValueError(
                f"PrismConfig.flex_backend must be one of {FLEX_BACKENDS}, got "
                f"{self.flex_backend!r}"
            )
        self._check_int("dense_final_blocks", 0)
        if (
            not _is_int(self.final_block_pool)
            or self.final_block_pool < 0
            or (self.final_block_pool and self.block_size % self.final_block_pool)
        ):
            raise ValueError(
                f"PrismConfig.final_block_pool must be 0 or an int dividing block_size "
                f"({self.block_size}), got {self.final_block_pool!r}"
            )
        self._check_int("local_blocks", 0)
        if self.output_error is not None and (
            not _is_real(self.output_error) or not (0.0 < self.output_error <= 1.0)
        ):
            raise ValueError(
                f"PrismConfig.output_error must be None or a number in (0, 1], got "
                f"{self.output_error!r}"
            )
        self._check_int("fit_query_blocks", 1)
        if not _is_int(self.fit_tokens) or self.fit_tokens < 16 or self.fit_tokens % 16:
            raise ValueError(
                f"PrismConfig.fit_tokens must be a multiple of 16, >= 16, got {self.fit_tokens!r}"
            )
        # Only with the fit on: the default (32) stays valid for small blocks when it is off.
        if self.output_error is not None and self.fit_tokens > self.block_size:
            raise ValueError(
                f"PrismConfig.fit_tokens ({self.fit_tokens}) must not exceed block_size "
                f"({self.block_size}) when output_error is set"
            )
        self._check_int("dense_below", 0)
        if (
            not _is_real(self.sparse_min_flops)
            or not math.isfinite(self.sparse_min_flops)
            or self.sparse_min_flops < 0
        ):
            raise ValueError(
                f"PrismConfig.sparse_min_flops must be a finite number >= 0, got "
                f"{self.sparse_min_flops!r}"
            )
        self._check_int("max_score_elements", 1)
        if self.relative_cut is not None:
            if not _is_real(self.relative_cut) or not (0.0 <= self.relative_cut <= 1.0):
                raise ValueError(
                    f"PrismConfig.relative_cut must be None or a number in [0, 1], got "
                    f"{self.relative_cut!r}"
                )
            if self.output_error is not None:
                raise ValueError(
                    "PrismConfig.relative_cut and output_error cannot both be set: the fit "
                    "chooses top-p thresholds; set relative_cut=None or output_error=None"
                )
        # The JSON form, made once: a compile of the user's model reads it as a constant
        # string (dynamo traces neither json nor a frozen dataclass's reconstruction).
        object.__setattr__(self, "_json", json.dumps(dataclasses.asdict(self), sort_keys=True))

    def runs_dense(self, q_shape, kv_len: int) -> bool:
        """Whether a call with q of shape ``(B, Hq, Lq, D)`` runs dense attention: ``Lq <
        dense_below``, or the dense causal attention of one row costs fewer than
        ``sparse_min_flops``.

        Per row, not per call: the selection's own cost grows with the rows too (a compiled
        batch runs row by row), so a batch of short rows gains nothing a single short row
        does not (8 rows of Qwen2.5-0.5B at 8K tokens would otherwise pass 6e11 and run the
        selection that loses 27 % on one row)."""
        _, heads, q_len, head_dim = q_shape
        if q_len < self.dense_below:
            return True
        return causal_attention_flops(1, heads, q_len, kv_len, head_dim) < self.sparse_min_flops

    @classmethod
    def from_fields(cls, fields, **overrides) -> "PrismConfig":
        """A config from command-line ``FIELD=VALUE`` strings, values read as Python literals
        (``final_block_pool=16``, ``calibrate=False``; a value that is no literal stays a
        string: ``rope_layout=interleaved``), then ``overrides``. Raises ``ValueError`` for
        an item without ``=``, an unknown field or a bad value."""
        import ast

        kwargs = {}
        for item in fields:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected FIELD=VALUE, got {item!r}")
            try:
                kwargs[name] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[name] = value
        kwargs.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown PrismConfig fields {unknown}; known: {sorted(names)}")
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PrismConfig":
        """The config of a named point of the accuracy/speed frontier (:data:`PRESETS`),
        with ``overrides`` (any field) applied on top.

        ``"accurate"``: the default (top-p 0.95); ``"balanced"``: top-p 0.9; ``"fast"``:
        top-p 0.8. Measured (Qwen2.5-Coder-0.5B, first 32K tokens of *Emma*, dense perplexity
        42.14; README "Presets" has 64K and 128K): perplexity 42.57 / 42.88 / 43.51 at block
        density 0.237 / 0.164 / 0.104, prefill 1.38x / 1.49x / 1.60x faster than cuDNN SDPA
        (H100). Raises ``ValueError`` for an unknown name."""
        if name not in PRESETS:
            raise ValueError(
                f"unknown PrismConfig preset {name!r}; known presets: {sorted(PRESETS)} "
                f"(or build PrismConfig(high_threshold=..., low_threshold=...) directly)"
            )
        return cls(**{**PRESETS[name], **overrides})

    def to_json(self) -> str:
        """The config as one JSON string (how it crosses the custom-op boundary)."""
        return self._json

    @classmethod
    def from_json(cls, text: str) -> "PrismConfig":
        """The inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < minimum:
            raise ValueError(f"PrismConfig.{name} must be an int >= {minimum}, got {value!r}")

    def band_dims(self, head_dim: int) -> tuple[int, int]:
        """``(high_dims, low_dims)`` for a head dim, defaults resolved and checked against it."""
        if not _is_int(head_dim) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 (RoPE pairs), got {head_dim!r}")
        high = self.high_band_dims
        low = self.low_band_dims
        high = _even_fraction(head_dim, _HIGH_FRACTION) if high is None else high
        low = _even_fraction(head_dim, _LOW_FRACTION) if low is None else low
        for name, value in (("high_band_dims", high), ("low_band_dims", low)):
            if value > head_dim:
                raise ValueError(
                    f"PrismConfig.{name}={value} is larger than the head dim {head_dim}"
                )
        return high, low
