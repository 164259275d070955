"""Prism attention inside a decoder-only transformer of your own, compiled with torch.compile.

A small Llama/Qwen-style model written from scratch (no download, random seeded weights):
token embedding, N x [RMSNorm -> attention (RoPE rotate-half, GQA) -> RMSNorm -> SwiGLU MLP],
final RMSNorm, LM head. The only Prism-specific line is ``self.attn = PrismAttention(config)``
in :class:`Attention`: it is called on the post-RoPE queries and the *unrepeated* key/value
cache (GQA is native, K/V are never repeated).

A static KV cache (one preallocated ``(B, Hkv, max_len, D)`` buffer per layer and per K/V)
lets the same compiled model do

* a long prefill in one call (Prism block-sparse attention),
* a chunked prefill (each chunk's queries attend to the cache plus themselves: ``Lq < Lkv``,
  bottom-right causal alignment),
* greedy decoding (``Lq = 1``: below ``PrismConfig.dense_below``, so dense attention).

It prints the prefill time, the mean block density of every layer, the decode speed, and the
relative error of the last position's logits against the same weights with dense attention.

About the random weights: a randomly initialised model attends almost uniformly, so there is
nothing for a block selection to find and the density stays close to 1. Real LLMs have two
properties that Prism relies on, and the ``structured`` initialisation below plants them on
purpose (it is *not* what a trained model looks like in any other respect):

1. locality: queries and keys of real models share a large position-independent component,
   which after RoPE makes ``q_i . k_j`` depend on ``i - j`` (strongest near the diagonal). Here
   every token embedding carries one shared direction, and each query head's projection is a
   noisy copy of its KV group's key projection, so that shared component survives in both;
2. peaky softmax: ``--qk-gain`` multiplies the query projection (trained models have much
   larger logit ranges than ``N(0, 1)`` init).

``--plain-init`` turns both off: expect a density near 1 and a tiny error, which says nothing
about quality on real models. Neither setting measures accuracy on real text; for that, run
Prism on a trained model.

Run:
    python examples/custom_model.py                      # CPU, 4096 tokens
    python examples/custom_model.py --chunk 1024         # also a chunked prefill
    python examples/custom_model.py --device cuda        # 32768 tokens
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

from prism_flex import PrismAttention, PrismConfig, dense_causal_attention

# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 1408
    rope_base: float = 1e6  # Qwen2-style long-context base
    norm_eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin ``(max_len, head_dim)`` for the rotate-half layout (pair i = dims i, i + D/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``(B, H, L, D)``; cos/sin ``(L, D)``."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class DenseAttention(nn.Module):
    """Same call signature as PrismAttention, dense causal SDPA: the reference."""

    def forward(self, q, k, v, *, return_density: bool = False):
        out = dense_causal_attention(q, k, v)
        if return_density:
            return out, torch.ones(q.shape[:2], dtype=torch.float32, device=q.device)
        return out


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, attn: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # The one Prism line: PrismAttention(prism_config), or DenseAttention() for the reference.
        self.attn = attn
        # Non-persistent buffers: not in the state dict, moved by .to(), updated in place.
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def allocate_cache(self, batch: int, max_len: int, dtype, device) -> None:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int, return_density: bool):
        b, length, _ = x.shape
        q = self.wq(x).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start_pos + length
        # Static cache: write this call's keys/values at their absolute positions, then attend
        # over everything cached so far (Lkv = end >= Lq, queries are the last Lq positions).
        self.k_cache[:, :, start_pos:end] = k
        self.v_cache[:, :, start_pos:end] = v
        k_all, v_all = self.k_cache[:, :, :end], self.v_cache[:, :, :end]
        if return_density:
            out, density = self.attn(q, k_all, v_all, return_density=True)
        else:
            out, density = self.attn(q, k_all, v_all), None
        out = out.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim)
        return self.wo(out), density


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, attn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, attn)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = FeedForward(args)

    def forward(self, x, cos, sin, start_pos, return_density):
        h, density = self.attention(self.attn_norm(x), cos, sin, start_pos, return_density)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), density


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, make_attn):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, make_attn()) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)

    def allocate_cache(self, batch: int, max_len: int) -> None:
        p = self.embed.weight
        for layer in self.layers:
            layer.attention.allocate_cache(batch, max_len, p.dtype, p.device)
        cos, sin = rope_tables(self.args.head_dim, max_len, self.args.rope_base)
        self.cos, self.sin = cos.to(p.device), sin.to(p.device)

    def forward(self, tokens: Tensor, start_pos: int, return_density: bool = False):
        """tokens ``(B, L)`` at absolute positions ``start_pos .. start_pos + L - 1``.

        Returns the logits of the last position ``(B, vocab)`` (all a generator needs; the
        full ``(B, L, vocab)`` would dominate memory at long L) and, with ``return_density``,
        the per-layer block densities ``(n_layers, B, Hq)``.
        """
        length = tokens.shape[1]
        cos = self.cos[start_pos : start_pos + length]
        sin = self.sin[start_pos : start_pos + length]
        x = self.embed(tokens)
        densities = []
        for layer in self.layers:
            x, density = layer(x, cos, sin, start_pos, return_density)
            densities.append(density)
        logits = self.lm_head(self.norm(x[:, -1]))
        if return_density:
            return logits, torch.stack(densities)
        return logits


@torch.no_grad()
def init_weights(model: Transformer, seed: int, structured: bool, qk_gain: float) -> None:
    """Seeded random init; ``structured`` plants locality (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    args = model.args

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    emb = normal(model.embed.weight.shape, 1.0)
    if structured:
        # One direction shared by every token (like the large mean component of real hidden
        # states): after RMSNorm and the q/k projections it becomes a position-independent part
        # of q and k, which RoPE turns into a relative-position (local) attention pattern.
        emb = emb + 1.5 * normal((1, args.dim), 1.0)
    model.embed.weight.copy_(emb.to(model.embed.weight))
    out_std = 1.0 / math.sqrt(2 * args.n_layers)
    group = args.n_heads // args.n_kv_heads
    for layer in model.layers:
        att, ffn = layer.attention, layer.ffn
        for lin in (att.wk, att.wv, ffn.w1, ffn.w3):
            lin.weight.copy_(normal(lin.weight.shape, 1.0 / math.sqrt(lin.in_features)))
        wk = att.wk.weight.view(args.n_kv_heads, args.head_dim, args.dim)
        wq = normal((args.n_heads, args.head_dim, args.dim), 1.0 / math.sqrt(args.dim))
        if structured:
            # Query head h = noisy copy of its KV head h // G: q and k share the common part.
            wq = 0.8 * wk.repeat_interleave(group, dim=0) + 0.6 * wq
        att.wq.weight.copy_(qk_gain * wq.reshape(att.wq.weight.shape))
        for lin in (att.wo, ffn.w2):
            lin.weight.copy_(normal(lin.weight.shape, out_std / math.sqrt(lin.in_features)))
    model.lm_head.weight.copy_(normal(model.lm_head.weight.shape, 1.0 / math.sqrt(args.dim)))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def rel_err(a: Tensor, ref: Tensor) -> float:
    a, ref = a.float(), ref.float()
    return ((a - ref).norm() / ref.norm()).item()


def dynamo_stats() -> dict:
    """Dynamo's counters; ``unique_graphs`` also counts prism_flex's internal compiled stages."""
    return dict(torch._dynamo.utils.counters["stats"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--length", type=int, default=None, help="prompt tokens (4096 CPU, 32768 CUDA)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (2 CPU, 8 CUDA)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument(
        "--chunk", type=int, default=0, help="also prefill in chunks of this many tokens (0: skip)"
    )
    p.add_argument("--threshold", type=float, default=0.95, help="top-p of both bands")
    p.add_argument(
        "--qk-gain",
        type=float,
        default=8.0,
        help="query projection scale: makes the toy model's attention peaky",
    )
    p.add_argument("--plain-init", action="store_true", help="no planted locality")
    p.add_argument("--no-compile", action="store_true", help="eager (debugging)")
    p.add_argument(
        "--dynamic",
        choices=("true", "auto"),
        default="true",
        help="torch.compile(dynamic=True) or dynamic=None (automatic)",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    length = a.length or (32768 if on_gpu else 4096)
    n_layers = a.layers or (8 if on_gpu else 2)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    args = ModelArgs(n_layers=n_layers)
    # sparse_min_flops=0: the selection at any length (small calls run dense by default).
    prism_cfg = PrismConfig(
        high_threshold=a.threshold, low_threshold=a.threshold, sparse_min_flops=0
    )

    model = Transformer(args, lambda: PrismAttention(prism_cfg))
    init_weights(model, a.seed, structured=not a.plain_init, qk_gain=a.qk_gain)
    model = model.to(device=device, dtype=dtype).eval()
    # Reference: identical weights, dense causal SDPA, run eagerly.
    ref = Transformer(args, DenseAttention).to(device=device, dtype=dtype).eval()
    ref.load_state_dict(model.state_dict())
    # One slot more than used: a slice of the whole buffer would be contiguous, and that
    # different stride guard would cost one more recompile at the very last decode step.
    max_len = length + a.decode_steps + 1
    model.allocate_cache(1, max_len)
    ref.allocate_cache(1, max_len)

    # dynamic=True: the prompt length, the chunk length and the KV length (which grows by one
    # every decode step) are symbolic from the first call, so one graph serves every decode
    # step and one every prefill length (sizes 0/1 are always specialised, so Lq = 1 decode
    # gets its own graph). With dynamic=None (--dynamic auto) the first call of each kind
    # compiles a static graph and the next one with other sizes recompiles it as dynamic: also
    # bounded, one compile more per kind. On GPU a symbolic length costs FlexAttention its
    # "length divisible by 128" fast path; pad prompts to a multiple of 128 if that matters.
    # PrismAttention enters this graph as one opaque op (prism_flex's custom op, which runs
    # its own compiled scoring and FlexAttention: traced inline, FlexAttention with an in-graph
    # mask trips inductor bugs in torch 2.11-2.13, on CPU and on CUDA).
    dynamic = {"true": True, "auto": None}[a.dynamic]
    compiled = model if a.no_compile else torch.compile(model, dynamic=dynamic)

    tokens = torch.randint(
        0, args.vocab_size, (1, length), generator=torch.Generator().manual_seed(a.seed + 1)
    ).to(device)
    print(
        f"device={device} dtype={dtype} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(
        f"model: {n_layers} layers, dim {args.dim}, {args.n_heads} q heads / {args.n_kv_heads} kv "
        f"heads x {args.head_dim}, init={'plain' if a.plain_init else 'structured'}, "
        f"qk_gain={a.qk_gain}"
    )
    print(f"prism: {prism_cfg}")

    # inference_mode rather than no_grad: under no_grad, the tensors reaching prism_flex's own
    # compiled stages (through its graph op) alternate between having and lacking the
    # ADInplaceOrView dispatch key, and each stage then compiles twice.
    with torch.inference_mode():
        # (a) one-call prefill. The first call compiles; the second is the timing.
        (_, t_first) = timed(lambda: compiled(tokens, 0, return_density=True), device)
        (logits, density), t_prefill = timed(
            lambda: compiled(tokens, 0, return_density=True), device
        )
        ref_logits, t_ref = timed(lambda: ref(tokens, 0), device)
        print(
            f"\nprefill {length} tokens: first call (compile) {t_first:.2f} s, "
            f"then {t_prefill * 1e3:.0f} ms; dense reference (same weights, eager, for the "
            f"error check, not a tuned baseline) {t_ref * 1e3:.0f} ms"
        )
        per_layer = density.float().mean(dim=(1, 2)).tolist()
        print("mean block density per layer: " + ", ".join(f"{d:.3f}" for d in per_layer))
        print(
            f"last-position logits rel. error vs dense: {rel_err(logits, ref_logits):.2e}, "
            f"argmax agrees: {bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())}"
        )
        print(f"dynamo stats after prefill: {dynamo_stats()}")

        # (b) chunked prefill: chunk i attends to the cache (chunks < i) plus itself.
        if a.chunk:

            def chunked():
                out = None
                for start in range(0, length, a.chunk):
                    out = compiled(tokens[:, start : start + a.chunk], start, return_density=True)
                return out

            _, t_first_c = timed(chunked, device)
            (logits_c, density_c), t_chunked = timed(chunked, device)
            print(
                f"\nchunked prefill ({a.chunk}-token chunks): first pass {t_first_c:.2f} s, "
                f"then {t_chunked * 1e3:.0f} ms; last chunk's mean density "
                f"{density_c.float().mean():.3f}; logits rel. error vs dense "
                f"{rel_err(logits_c, ref_logits):.2e}, vs the one-call prefill "
                f"{rel_err(logits_c, logits):.2e}"
            )
            print(f"dynamo stats after chunked prefill: {dynamo_stats()}")

        # (c) greedy decode: Lq = 1 < dense_below, so PrismAttention runs dense SDPA.
        if a.decode_steps:
            nxt = logits.argmax(-1, keepdim=True)
            agree, step_times = 0, []
            for i in range(a.decode_steps):
                out, dt = timed(lambda: compiled(nxt, length + i), device)
                ref_out = ref(nxt, length + i)  # the reference is fed the same tokens
                agree += int((out.argmax(-1) == ref_out.argmax(-1)).all())
                step_times.append(dt)
                nxt = out.argmax(-1, keepdim=True)
                if i == 0:
                    graphs_after_first = dynamo_stats().get("unique_graphs", 0)
            steady = step_times[1:] or step_times
            print(
                f"\ndecode {a.decode_steps} steps: first step (compile) {step_times[0]:.2f} s, "
                f"then {len(steady) / sum(steady):.1f} tokens/s; greedy token agrees with "
                f"dense at {agree}/{a.decode_steps} steps"
            )
            print(
                f"dynamo stats after decode: {dynamo_stats()} (unique_graphs after the first "
                f"decode step: {graphs_after_first})"
            )


if __name__ == "__main__":
    main()
