"""Context parallelism (prism_flex.parallel) on 2 CPU ranks (gloo), against one process.

Each rank builds the same whole-sequence inputs, keeps its shard and checks its part of the
result against the single-process Prism call it computes itself: selected blocks identical,
outputs within rounding. Eager (compiled=False) in the default run; the compiled path is in
the slow set.
"""

from __future__ import annotations

import pytest
import torch

from prism_flex import PrismConfig, dense_causal_attention, prism_attention, prism_block_mask
from prism_flex.parallel import (
    LOAD_BALANCERS,
    context_parallel_prism_attention,
    context_parallel_prism_block_mask,
    shard_layout,
    shard_sequence,
    unshard_sequence,
)

from .conftest import structured_qkv
from .distributed import spawn

BS = 32
SPARSE = PrismConfig(
    block_size=BS, dense_below=0, sparse_min_flops=0, high_threshold=0.8, low_threshold=0.8
)
SPARSE_PLAIN = PrismConfig(
    block_size=BS,
    dense_below=0,
    sparse_min_flops=0,
    final_block_pool=0,
    local_blocks=0,
    calibrate=False,
    max_score_elements=4 * 4 * 8,  # several chunks of query blocks per rank
)
ONE = PrismConfig(
    block_size=BS, dense_below=0, sparse_min_flops=0, high_threshold=1.0, low_threshold=1.0
)
FLOORED = PrismConfig(block_size=BS)  # the default floors: these sizes run dense
# 512: aligned (16 blocks, 4 per head-tail chunk); 500: short last block; 544: 17 blocks,
# chunks of unequal length.
LENGTHS = (512, 500, 544)


def _check_rank(rank, world, length, balancer, config, compiled):
    q, k, v = structured_qkv(1, 4, 2, length, length, 32, seed=length, block_size=BS)
    layout = shard_layout(length, world, balancer, BS)
    mine = [
        shard_sequence(t, rank, world, load_balancer=balancer, block_size=BS) for t in (q, k, v)
    ]
    assert mine[0].shape[2] == layout.local_len(rank)
    out, density = context_parallel_prism_attention(
        *mine, config, load_balancer=balancer, return_density=True, compiled=compiled
    )
    want, want_density = prism_attention(q, k, v, config, return_density=True, compiled=compiled)
    torch.testing.assert_close(
        out,
        shard_sequence(want, rank, world, load_balancer=balancer, block_size=BS),
        atol=2e-5,
        rtol=2e-5,
    )
    torch.testing.assert_close(
        unshard_sequence(out, load_balancer=balancer, block_size=BS), want, atol=2e-5, rtol=2e-5
    )
    assert torch.equal(density, want_density), (density, want_density)
    if config.runs_dense(q.shape, length):
        return density
    mask = context_parallel_prism_block_mask(
        mine[0], mine[1], config, load_balancer=balancer, compiled=compiled
    )
    assert mask.seq_lengths == (mine[0].shape[2], length)
    rows = torch.tensor(layout.block_rows(rank))
    whole = prism_block_mask(q, k, config, compiled=compiled).to_dense()
    assert torch.equal(mask.to_dense(), whole[:, :, rows])
    return density


def _cp_eager(rank, world):
    for balancer in LOAD_BALANCERS:
        for length in LENGTHS:
            density = _check_rank(rank, world, length, balancer, SPARSE, False)
            assert float(density.mean()) < 0.9, "the test input selects every block"
        _check_rank(rank, world, 512, balancer, SPARSE_PLAIN, False)
        _check_rank(rank, world, 500, balancer, ONE, False)
        _check_rank(rank, world, 512, balancer, FLOORED, False)
        # threshold 1.0 is dense attention
        q, k, v = structured_qkv(1, 4, 2, 512, 512, 32, seed=3, block_size=BS)
        mine = [
            shard_sequence(t, rank, world, load_balancer=balancer, block_size=BS) for t in (q, k, v)
        ]
        out = context_parallel_prism_attention(*mine, ONE, load_balancer=balancer, compiled=False)
        dense = shard_sequence(
            dense_causal_attention(q, k, v), rank, world, load_balancer=balancer, block_size=BS
        )
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)
    # token ids (dim 1) round-trip
    ids = torch.arange(2 * 544).view(2, 544)
    local = shard_sequence(ids, rank, world, block_size=BS, dim=1)
    assert torch.equal(unshard_sequence(local, block_size=BS, dim=1), ids)


def _cp_errors(rank, world):
    q, k, v = structured_qkv(1, 4, 2, 512, 512, 32, seed=0, block_size=BS)
    # Shards of another length split: every rank raises the same error (no hang).
    mine = [t[:, :, : 200 + 8 * rank] for t in (q, k, v)]
    for balancer in LOAD_BALANCERS:
        with pytest.raises(ValueError, match=f"not the '{balancer}' sharding"):
            context_parallel_prism_attention(*mine, SPARSE, load_balancer=balancer, compiled=False)
    tiny = [t[:, :, :BS] for t in (q, k, v)]  # 2 blocks in all: fewer than 2W chunks
    with pytest.raises(ValueError, match="needs at least 4 blocks"):
        context_parallel_prism_attention(*tiny, SPARSE, load_balancer="head_tail", compiled=False)
    with pytest.raises(NotImplementedError, match="inference only"):
        context_parallel_prism_attention(q.requires_grad_(), k, v, SPARSE, compiled=False)


def test_layout():
    layout = shard_layout(1024, 2, "head_tail", 128)
    assert layout.runs == (((0, 256), (768, 1024)), ((256, 768),))
    assert shard_layout(1024, 2, "contiguous", 128).runs == (((0, 512),), ((512, 1024),))
    # 1000 tokens: 8 blocks, the last one short.
    odd = shard_layout(1000, 2, "head_tail", 128)
    assert odd.runs == (((0, 256), (768, 1000)), ((256, 768),))
    assert [odd.local_len(r) for r in range(2)] == [488, 512]
    assert odd.block_rows(0) == [0, 1, 6, 7]
    # 9 blocks over 4 chunks: 3, 2, 2, 2
    assert shard_layout(1100, 2, "head_tail", 128).runs[0] == ((0, 384), (896, 1100))
    with pytest.raises(ValueError, match="needs at least 4 blocks"):
        shard_layout(384, 2, "head_tail", 128)
    rr = shard_layout(1000, 3, "round_robin", 128)
    assert rr.runs == (
        ((0, 128), (384, 512), (768, 896)),
        ((128, 256), (512, 640), (896, 1000)),
        ((256, 384), (640, 768)),
    )
    assert shard_layout(1000, 1, "round_robin", 128).runs == (((0, 1000),),)
    with pytest.raises(ValueError, match="needs at least 3 blocks"):
        shard_layout(256, 3, "round_robin", 128)
    with pytest.raises(ValueError, match="load_balancer"):
        shard_layout(1024, 2, "zigzag", 128)
    x = torch.arange(1000)
    parts = [
        shard_sequence(x, r, 2, load_balancer="head_tail", block_size=128, dim=0) for r in range(2)
    ]
    assert sorted(torch.cat(parts).tolist()) == list(range(1000))
    assert parts[1].tolist() == list(range(256, 768))


def test_head_tail_matches_torch_order():
    """On lengths divisible by 2W x block_size our head-tail shards are PyTorch's (its
    private _HeadTailLoadBalancer; skipped where that module is absent)."""
    lb = pytest.importorskip(
        "torch.distributed.tensor.experimental._context_parallel._load_balancer"
    )
    for world in (2, 4):
        order = lb._HeadTailLoadBalancer(2048, world, "cpu")._generate_indices()[0].tolist()
        ours = [
            p
            for r in range(world)
            for p in shard_layout(2048, world, "head_tail", 128).positions(r)
        ]
        assert ours == order


def test_context_parallel_eager():
    spawn(_cp_eager, 2)


def test_context_parallel_errors():
    spawn(_cp_errors, 2)


def _cp_compiled(rank, world):
    for balancer in LOAD_BALANCERS:
        for length in (512, 500):
            _check_rank(rank, world, length, balancer, SPARSE, True)


@pytest.mark.slow
def test_context_parallel_compiled():
    spawn(_cp_compiled, 2, timeout=600)


def _bench_smoke(rank, world, out):
    from bench import parallel

    parallel.main(
        ["--device", "cpu", "--lengths", "1024", "--heads", "4", "--kv-heads", "2"]
        + ["--head-dim", "32", "--dtype", "float32", "--eager", "--reps", "1", "--single", "both"]
        + ["--config", "dense_below=0", "sparse_min_flops=0", "block_size=64", "--out", out]
    )


def test_bench_parallel_smoke(tmp_path):
    """bench/parallel.py (the multi-GPU benchmark) runs on 2 gloo ranks at a tiny size."""
    import json

    out = tmp_path / "cp.json"
    spawn(_bench_smoke, 2, str(out))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    rows = {(r["row"], r.get("balancer")): r for r in result["rows"]}
    assert set(rows) == {
        ("single_prism", None),
        ("single_dense", None),
        ("cp_prism", "round_robin"),
        ("cp_dense", "round_robin"),
        ("cp_prism", "head_tail"),
        ("cp_dense", "head_tail"),
    }
    assert rows["cp_prism", "round_robin"]["density"] == rows["single_prism", None]["density"]
    assert rows["cp_dense", "head_tail"]["density"] == 1.0
