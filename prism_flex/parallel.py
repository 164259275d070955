"""Context parallelism: Prism attention over a sequence sharded across ranks.

Each rank of a process group holds a slice of the sequence (its *shard*) for q, k and v, laid
out by :func:`shard_sequence`; :func:`context_parallel_prism_attention` returns the attention
output of the rank's own queries, as :func:`prism_flex.prism_attention` would compute it for
those positions on one device. How:

1. The rank pools its own queries and keys into block means (``block_size`` tokens, and
   ``final_block_pool`` tokens for the keys), and the pooled rows of every rank are gathered
   (``torch.distributed.all_gather_into_tensor``): ``L / 128`` rows per head, about 1/128 of
   the keys (plus 1/16 with ``final_block_pool``). The selection of the rank's query blocks
   then runs locally, over the pooled keys of the whole sequence, with the calibration
   statistics of the whole sequence: it selects exactly what one device would.
2. K and V are all-gathered (the same collective, started before the selection and waited for
   after it, so that the two overlap), as PyTorch's own context parallelism for FlexAttention
   does (``torch.distributed.tensor.experimental._context_parallel``: its ``flex_cp_allgather``).
3. Each rank runs FlexAttention for its query blocks over all keys, in chunks of query blocks
   as :func:`prism_flex.prism_attention` does for long inputs, with a ``BlockMask`` whose rows
   are the rank's blocks (the causal diagonal's ``mask_mod`` maps each local query to its
   global position).

No communication layer of our own: only ``torch.distributed`` collectives. The whole-sequence
K/V on every rank is the memory cost of the all-gather design (2 x Hkv x L x D per rank, 4 GiB
in bf16 at 1M tokens of the Llama-3.1-8B shape); the queries, the score tables and the output
stay sharded.

Load balancing: a causal mask gives late query blocks more keys than early ones, so
``"contiguous"`` shards (rank r holds the r-th 1/W of the sequence) do unequal work.
``"head_tail"`` (PyTorch's ``_HeadTailLoadBalancer`` order) cuts the sequence into 2W chunks
and gives rank r chunks r and 2W-1-r, which evens the causal triangle exactly, but Prism's
work per query block is not the triangle's (its selected blocks grow unevenly along the
sequence). ``"round_robin"`` (the default) deals the blocks out one by one, block i to rank
i mod W: on synthetic inputs at 32K-128K tokens the busiest rank did 1.01-1.26x the mean work,
against 1.05-1.48x for head-tail and 1.49-2.30x for contiguous (``docs/design.md``,
``bench/cp_balance.py``).

Lengths: shards are whole blocks of ``block_size`` tokens (so every pooled block lies on one
rank); a length that is not a multiple of ``W x block_size`` (head-tail: ``2W x
block_size``) gives ranks that differ by one block, and the last block may be short. A
sequence needs at least one block per rank (head-tail: per chunk).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from . import pipeline
from ._compile import Mode, lengths_only_dynamic, run_stage, uniform_dispatch_keys
from .block_mask import BlockTables, compact_blocks
from .checks import check_inputs
from .config import PrismConfig
from .scoring import pool_blocks
from .selection import Thresholds, select_rows

__all__ = [
    "LOAD_BALANCERS",
    "DEFAULT_LOAD_BALANCER",
    "ShardLayout",
    "shard_layout",
    "shard_sequence",
    "unshard_sequence",
    "context_parallel_prism_attention",
    "context_parallel_prism_block_mask",
]

#: How a sequence is cut across ranks: ``"round_robin"`` (block i on rank i mod W),
#: ``"head_tail"`` (2W chunks, rank r holds chunks r and 2W-1-r) or ``"contiguous"`` (W
#: chunks, rank r holds chunk r).
LOAD_BALANCERS = ("round_robin", "head_tail", "contiguous")

#: The default: of the three it evens the work of Prism's causal sparse masks best
#: (docs/design.md, ``bench/cp_balance.py``).
DEFAULT_LOAD_BALANCER = "round_robin"

_DEFAULT_CONFIG = PrismConfig()


class ShardLayout(NamedTuple):
    """Which tokens each rank holds.

    ``runs[r]`` lists rank r's runs of consecutive tokens ``(start, end)`` (end exclusive) in
    the order the rank stores them; every run starts on a block boundary and all but the
    sequence's last run end on one.
    """

    seq_len: int
    block_size: int
    runs: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.runs)

    def local_len(self, rank: int) -> int:
        """Tokens held by ``rank``."""
        return sum(end - start for start, end in self.runs[rank])

    def block_rows(self, rank: int) -> list[int]:
        """Global indices of the query blocks held by ``rank``, in its storage order."""
        bs = self.block_size
        return [b for start, end in self.runs[rank] for b in range(start // bs, -(-end // bs))]

    def positions(self, rank: int) -> list[int]:
        """Global positions of the tokens held by ``rank``, in its storage order."""
        return [p for start, end in self.runs[rank] for p in range(start, end)]


@functools.lru_cache(maxsize=64)
def shard_layout(
    seq_len: int,
    world_size: int,
    load_balancer: str = DEFAULT_LOAD_BALANCER,
    block_size: int = 128,
) -> ShardLayout:
    """The :class:`ShardLayout` of a ``seq_len``-token sequence over ``world_size`` ranks.

    Round-robin: block i of the ``ceil(seq_len / block_size)`` blocks goes to rank
    ``i % world_size``. Contiguous and head-tail: the blocks are cut into ``world_size``
    (contiguous) or ``2 * world_size`` (head-tail) chunks of consecutive blocks, as equal as
    possible (the first chunks take one block more); with ``seq_len`` a multiple of ``2 *
    world_size * block_size`` every rank holds the same number of tokens, in PyTorch's
    head-tail order (``_HeadTailLoadBalancer``).

    Raises:
        ValueError: an unknown balancer, or fewer blocks than ranks (head-tail: than 2 x
        ranks).
    """
    if load_balancer not in LOAD_BALANCERS:
        raise ValueError(f"load_balancer must be one of {LOAD_BALANCERS}, got {load_balancer!r}")
    sizes = (("seq_len", seq_len), ("world_size", world_size), ("block_size", block_size))
    for name, value in sizes:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    blocks = -(-seq_len // block_size)
    chunks = 2 * world_size if load_balancer == "head_tail" else world_size
    if blocks < chunks:
        raise ValueError(
            f"{seq_len} tokens are {blocks} blocks of {block_size}; {load_balancer!r} sharding "
            f"over {world_size} ranks deals whole blocks and needs at least {chunks} blocks "
            f"({(chunks - 1) * block_size + 1} tokens, or fewer ranks)"
        )
    if load_balancer == "round_robin":
        runs = tuple(
            _merged(
                (b * block_size, min((b + 1) * block_size, seq_len))
                for b in range(r, blocks, world_size)
            )
            for r in range(world_size)
        )
        return ShardLayout(seq_len, block_size, runs)
    bounds = [0]
    for i in range(chunks):
        bounds.append(bounds[-1] + blocks // chunks + (i < blocks % chunks))
    tokens = [(a * block_size, min(b * block_size, seq_len)) for a, b in zip(bounds, bounds[1:])]
    if load_balancer == "contiguous":
        runs = tuple((tokens[r],) for r in range(world_size))
    else:
        runs = tuple(_merged((tokens[r], tokens[chunks - 1 - r])) for r in range(world_size))
    return ShardLayout(seq_len, block_size, runs)


def _merged(runs) -> tuple[tuple[int, int], ...]:
    """Runs with adjacent ones joined (one rank: a single run)."""
    out: list[tuple[int, int]] = []
    for start, end in runs:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return tuple(out)


def shard_sequence(
    x: Tensor,
    rank: int,
    world_size: int,
    *,
    load_balancer: str = DEFAULT_LOAD_BALANCER,
    block_size: int = 128,
    dim: int = 2,
) -> Tensor:
    """Rank ``rank``'s shard of a whole-sequence tensor (contiguous copy).

    Args:
        x: any tensor whose ``dim`` is the sequence (q, k, v ``(B, H, L, D)``: ``dim=2``;
            token ids ``(B, L)``: ``dim=1``; position ids likewise).
        block_size: the ``PrismConfig.block_size`` the shards will be used with.
    """
    layout = shard_layout(x.shape[dim], world_size, load_balancer, block_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    pieces = [x.narrow(dim, start, end - start) for start, end in layout.runs[rank]]
    return torch.cat(pieces, dim=dim)


def unshard_sequence(
    x_local: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    load_balancer: str = DEFAULT_LOAD_BALANCER,
    block_size: int = 128,
    dim: int = 2,
) -> Tensor:
    """The whole sequence, in order, on every rank: the inverse of :func:`shard_sequence`
    (an all-gather; collective: every rank of ``group`` must call it)."""
    x = x_local.movedim(dim, 0)
    rest = x.shape[1:]
    x = x.reshape(x.shape[0], -1)[None, None]  # (1, 1, L_r, M): the gathers' layout
    layout = _layout_of(x.shape[2], x.device, group, load_balancer, block_size)
    out = _gather(x, layout, 1, group).result()
    return out.reshape((layout.seq_len,) + tuple(rest)).movedim(0, dim)


class _Gather:
    """An all-gather of the rows of every rank (in units of ``unit`` tokens) into sequence
    order, started by :func:`_gather`; :meth:`result` waits for it."""

    def __init__(self, out: Tensor, work, pieces, count: int):
        self.out, self.work, self.pieces, self.count = out, work, pieces, count

    def result(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
        world = len(self.pieces)
        out = self.out.unflatten(0, (world, -1))  # (W, B, H, max rows, D)
        parts = [out[rank, :, :, start:end] for rank, start, end in _ordered(self.pieces)]
        if len(parts) == 1:
            return parts[0].contiguous()
        return torch.cat(parts, dim=2)


def _ordered(pieces):
    """``(rank, local start, local end)`` of every run, in sequence order."""
    flat = [(first, rank, a, b) for rank, runs in enumerate(pieces) for first, a, b in runs]
    return [(rank, a, b) for _, rank, a, b in sorted(flat)]


def _gather(x: Tensor, layout: ShardLayout, unit: int, group, async_op: bool = False) -> _Gather:
    """Start gathering ``x`` ``(B, H, rows, D)``: this rank's rows (one per ``unit`` tokens,
    a last short unit counting as one), from every rank, padded to the longest shard."""
    pieces = []
    for runs in layout.runs:
        local, rank_pieces = 0, []
        for start, end in runs:
            n = -(-(end - start) // unit)
            rank_pieces.append((start, local, local + n))
            local += n
        pieces.append(rank_pieces)
    longest = max(p[-1][2] for p in pieces)
    x = x.contiguous()
    if x.shape[2] < longest:
        x = F.pad(x, (0, 0, 0, longest - x.shape[2]))
    out = x.new_empty((layout.world_size * x.shape[0],) + tuple(x.shape[1:]))
    work = dist.all_gather_into_tensor(out, x, group=group, async_op=async_op)
    return _Gather(out, work if async_op else None, pieces, longest)


def _layout_of(local_len: int, device, group, load_balancer, block_size) -> ShardLayout:
    """The layout that the local lengths of all ranks form (one small all-gather), checked:
    every rank raises the same error, so that none is left waiting in a collective."""
    world = dist.get_world_size(group)
    mine = torch.tensor([local_len], dtype=torch.int64, device=device)
    every = mine.new_empty(world)
    dist.all_gather_into_tensor(every, mine, group=group)
    lengths = every.tolist()
    total = sum(lengths)
    try:
        layout = shard_layout(total, world, load_balancer, block_size)
    except ValueError as error:
        raise ValueError(f"local lengths {lengths} over {world} ranks: {error}") from None
    want = [layout.local_len(r) for r in range(world)]
    if lengths != want:
        raise ValueError(
            f"the local sequence lengths {lengths} are not the {load_balancer!r} sharding of "
            f"{total} tokens over {world} ranks with block_size {block_size} ({want}): shard "
            f"q, k and v with prism_flex.parallel.shard_sequence(x, rank, world_size, "
            f"load_balancer={load_balancer!r}, block_size={block_size})"
        )
    return layout


class _Plan(NamedTuple):
    layout: ShardLayout
    rank: int
    rows: Tensor  # int64 (R,): global query blocks of this rank, storage order
    block_start: Tensor  # int32 (R,): their first global position


def _plan(q, k, v, config, group, load_balancer) -> _Plan:
    """Checks (the same on every rank, or raised before any collective) and the layout."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context parallel attention needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    if not isinstance(config, PrismConfig):
        raise TypeError(f"config must be a PrismConfig, got {type(config).__name__}")
    check_inputs(q, k, v)
    config.band_dims(q.shape[-1])
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"context parallel attention is self-attention over one sharded sequence: q and "
            f"k must hold the same positions, got local lengths {q.shape[2]} and {k.shape[2]}"
        )
    if config.output_error is not None:
        raise NotImplementedError(
            "PrismConfig.output_error (the threshold fit) is not supported under context "
            "parallelism: its sampled queries span all ranks; use fixed thresholds"
        )
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            "context parallel attention runs eagerly (its stages are compiled inside); call "
            "it outside torch.compile or behind torch.compiler.disable"
        )
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v) if t is not None)
    if grad:
        raise NotImplementedError(
            "context parallel attention is inference only: run it under torch.no_grad() or "
            "torch.inference_mode()"
        )
    layout = _layout_of(q.shape[2], q.device, group, load_balancer, config.block_size)
    rank = dist.get_rank(group)
    rows = torch.tensor(layout.block_rows(rank), dtype=torch.int64, device=q.device)
    return _Plan(layout, rank, rows, (rows * config.block_size).to(torch.int32))


def _select_row_tables(
    config, scores, rows, q_len, kv_len, high_thr, low_thr, fine_thr
) -> BlockTables:
    """Index tables of any query blocks ``rows`` (int64 ``(R,)``), as
    :func:`~prism_flex.block_mask.select_tables` makes them for a range of blocks."""
    selected, _, diagonal = select_rows(
        config, scores, rows, q_len, kv_len, high_thr, low_thr, fine_thr
    )
    return BlockTables(*compact_blocks(selected & diagonal), *compact_blocks(selected & ~diagonal))


def _position_mask_mod(block_start: Tensor, block_size: int):
    """Causal ``mask_mod`` of query blocks that start at global positions ``block_start``
    (int32 ``(R,)``), local query ``q_idx`` against global key ``kv_idx``: right on every
    pair (the mask of :func:`context_parallel_prism_block_mask`, and eager FlexAttention,
    which evaluates it everywhere)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return block_start[q_idx // block_size] + q_idx % block_size >= kv_idx

    return mask_mod


def _diagonal_mask_mod(block_size: int):
    """Causal ``mask_mod`` that is right on the diagonal blocks only, where query block g
    meets key block g (``Lq == Lkv``, block-aligned shards): the position inside the block
    decides. Compiled FlexAttention evaluates ``mask_mod`` only on the partial blocks, which
    are exactly those. Why not :func:`_position_mask_mod` there: its table lookup made the
    CPU C++ template of FlexAttention fail to compile (torch 2.13, "cur_qSplitSize2 was not
    declared")."""

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx % block_size >= kv_idx % block_size

    return mask_mod


def _scores(q, k, config, plan: _Plan, group, mode):
    """Band scores of the whole sequence from the pooled rows of every rank."""
    bs, layout = config.block_size, plan.layout
    q_pool = _gather(pool_blocks(q, bs), layout, bs, group).result()
    k_pool = _gather(pool_blocks(k, bs), layout, bs, group).result()
    q_final = k_fine = None
    if config.final_block_pool:
        pool = config.final_block_pool
        k_fine = _gather(pool_blocks(k, pool), layout, pool, group).result()
        # The last query block, pooled finer: only its owner uses it (select_rows keeps the
        # finer row for block Nq - 1 only); the others pass zeros of the same shape.
        last = -(-layout.seq_len // bs) - 1
        rows = layout.block_rows(plan.rank)
        b, hq, _, d = q.shape
        q_final = q.new_zeros((b, hq, bs // pool, d), dtype=torch.float32)
        if last in rows:
            j = rows.index(last)
            mine = pool_blocks(q[:, :, j * bs :], pool)
            q_final[:, :, : mine.shape[2]] = mine
    pooled = pipeline.Pooled(q_pool, k_pool, q_final, k_fine)
    if mode is Mode.COMPILED:
        pooled = pipeline.Pooled(*lengths_only_dynamic(*pooled))
        if q_final is not None:
            torch._dynamo.mark_static(pooled.q_final, 2)
    return pipeline.band_scores(pooled, config, mode)


def _tables(scores, rows, config, seq_len, mode) -> BlockTables:
    tables = run_stage(
        _select_row_tables, mode, config, scores, rows, seq_len, seq_len, *Thresholds.of(config)
    )
    if mode is Mode.COMPILED:
        tables = BlockTables(*lengths_only_dynamic(*tables, head_dim=False))
    return tables


def _block_mask(tables: BlockTables, block_start, q_len: int, kv_len: int, bs: int):
    """``block_start`` ``None``: :func:`_diagonal_mask_mod` (for compiled FlexAttention)."""
    if block_start is None:
        mask_mod = _diagonal_mask_mod(bs)
    else:
        mask_mod = _position_mask_mod(block_start, bs)
    return BlockMask.from_kv_blocks(
        *tables,
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
        compute_q_blocks=False,
    )


@uniform_dispatch_keys
@torch.no_grad()
def context_parallel_prism_block_mask(
    q_local: Tensor,
    k_local: Tensor,
    config: PrismConfig = _DEFAULT_CONFIG,
    *,
    group: Optional[dist.ProcessGroup] = None,
    load_balancer: str = DEFAULT_LOAD_BALANCER,
    compiled: bool = True,
) -> BlockMask:
    """The Prism ``BlockMask`` of this rank's queries over the whole sequence's keys.

    Collective (every rank of ``group`` calls it). Its rows are the rank's query blocks in
    storage order, and they equal the rows of :func:`prism_flex.prism_block_mask` of the
    unsharded sequence at those blocks (``ShardLayout.block_rows``). ``seq_lengths`` is
    ``(local length, whole length)``; ``mask_mod`` maps local queries to their positions.

    Args:
        q_local: ``(B, Hq, L_r, D)`` after RoPE; k_local: ``(B, Hkv, L_r, D)``: this rank's
            shard (:func:`shard_sequence`) of one causal sequence.
    """
    plan = _plan(q_local, k_local, None, config, group, load_balancer)
    mode = Mode.at_entry(compiled)
    q, k = q_local.detach(), k_local.detach()
    scores = _scores(q, k, config, plan, group, mode)
    tables = _tables(scores, plan.rows, config, plan.layout.seq_len, mode)
    return _block_mask(tables, plan.block_start, q.shape[2], plan.layout.seq_len, config.block_size)


def context_parallel_prism_attention(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    config: PrismConfig = _DEFAULT_CONFIG,
    *,
    group: Optional[dist.ProcessGroup] = None,
    load_balancer: str = DEFAULT_LOAD_BALANCER,
    scale: Optional[float] = None,
    return_density: bool = False,
    compiled: bool = True,
):
    """Prism causal attention of a sequence sharded over the ranks of ``group``.

    Collective: every rank of ``group`` calls it with its shard (:func:`shard_sequence` with
    the same ``load_balancer`` and ``config.block_size``) and gets the output of its own
    queries, in its storage order: what :func:`prism_flex.prism_attention` of the whole
    sequence gives at those positions (same selected blocks; outputs within rounding).

    Args:
        q_local: ``(B, Hq, L_r, D)`` after RoPE; k_local, v_local: ``(B, Hkv, L_r, D)``;
            GQA native. Self-attention prefill of one sequence from position 0 (no KV cache,
            no padding), every rank on its own device.
        config: as for :func:`~prism_flex.prism_attention`; ``output_error`` is not
            supported. A call too small for sparsity to pay (:meth:`PrismConfig.runs_dense`
            of the whole sequence) runs dense SDPA over the gathered K/V.
        group: the context parallel process group (default: the world).
        load_balancer: one of :data:`LOAD_BALANCERS`.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_density: also return the block density of the whole call, float32
            ``(B, Hq)``, the same on every rank (one more all-reduce).
        compiled: run the compiled scoring and FlexAttention (``False``: eager, small tests).
    Returns:
        ``(B, Hq, L_r, D)`` in the input dtype (and the density).

    Inference only: inputs that require grad with grad enabled raise.
    """
    plan = _plan(q_local, k_local, v_local, config, group, load_balancer)
    out, density = _attend(
        q_local, k_local, v_local, config, plan, group, scale, compiled, return_density
    )
    return (out, density) if return_density else out


@uniform_dispatch_keys
@torch.no_grad()
def _attend(q, k, v, config, plan: _Plan, group, scale, compiled, density: bool):
    mode = Mode.at_entry(compiled)
    layout, bs = plan.layout, config.block_size
    seq_len = layout.seq_len
    batch, hq, _, head_dim = q.shape
    # K/V move while the selection runs.
    k_all = _gather(k, layout, 1, group, async_op=True)
    v_all = _gather(v, layout, 1, group, async_op=True)
    if config.runs_dense((batch, hq, seq_len, head_dim), seq_len):
        keys, values = k_all.result(), v_all.result()
        pos = torch.tensor(layout.positions(plan.rank), device=q.device)
        mask = pos[:, None] >= torch.arange(seq_len, device=q.device)[None, :]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale, enable_gqa=hq != k.shape[1]
        )
        ones = torch.ones((batch, hq), dtype=torch.float32, device=q.device)
        return out, ones if density else None
    scores = _scores(q, k, config, plan, group, mode)
    keys, values = k_all.result(), v_all.result()
    nk = -(-seq_len // bs)
    rows = pipeline.chunk_rows(config, batch, hq, nk)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    chosen = torch.zeros((batch, hq), dtype=torch.float32, device=q.device)
    local_len, count = q.shape[2], plan.rows.shape[0]
    for start in range(0, count, rows):
        end = min(start + rows, count)
        tables = _tables(scores, plan.rows[start:end], config, seq_len, mode)
        first, last = start * bs, min(end * bs, local_len)
        starts = plan.block_start[start:end] if mode is Mode.EAGER else None
        mask = _block_mask(tables, starts, last - first, seq_len, bs)
        q_chunk = q[:, :, first:last].contiguous()
        out[:, :, first:last] = pipeline.sparse_attention(q_chunk, keys, values, mask, scale, mode)
        chosen += (tables.partial_num.sum(-1) + tables.full_num.sum(-1)).float()
    if not density:
        return out, None
    dist.all_reduce(chosen, group=group)
    visible = pipeline.visible_blocks(seq_len, seq_len, bs, nk, q.device)
    return out, chosen / visible
