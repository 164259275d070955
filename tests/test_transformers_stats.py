"""Density statistics through the Hugging Face integration (record_density), on CPU.

A tiny randomly initialised Llama (2 layers, 4 query heads, 2 KV heads, head dim 32) with eager
Prism (compiled=False) and no size floor, so short prompts take the sparse path.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


from prism_flex import PrismConfig  # noqa: E402
from prism_flex.integrations.transformers import (  # noqa: E402
    DensityRecorder,
    record_density,
    register,
)

from .hf_models import tiny_model, tiny_prompt  # noqa: E402

# Thresholds 0.8: at the default 0.95 a random model's 256-token prompt keeps every block.
SPARSE = PrismConfig(
    dense_below=0, sparse_min_flops=0, block_size=16, high_threshold=0.8, low_threshold=0.8
)
THRESHOLD_ONE = PrismConfig(
    dense_below=0, sparse_min_flops=0, block_size=16, high_threshold=1.0, low_threshold=1.0
)
FLOORED = PrismConfig(block_size=16)  # default floors: a short prompt runs dense
SPARSE_NAME = register(SPARSE, "prism_stats_sparse", compiled=False)
ONE_NAME = register(THRESHOLD_ONE, "prism_stats_one", compiled=False)
FLOORED_NAME = register(FLOORED, "prism_stats_floored", compiled=False)
LAYERS = 2  # hf_models.COMMON


def _model(attn):
    return tiny_model("llama", attn)


def _prompt(length, batch=1):
    return tiny_prompt(length, batch)


def test_one_record_per_layer_per_forward():
    model = _model(SPARSE_NAME)
    prompt = _prompt(256, batch=2)
    with torch.no_grad(), record_density() as rec:
        model(prompt)
        assert len(rec) == LAYERS
        model(prompt)
    assert isinstance(rec, DensityRecorder)
    assert len(rec) == 2 * LAYERS
    assert [r.layer for r in rec.records] == list(range(LAYERS)) * 2
    for r in rec.records:
        assert (r.q_len, r.kv_len) == (256, 256)
        assert r.density.shape == (2, 4) and r.density.dtype == torch.float32
        assert not r.dense
        assert bool(((r.density > 0) & (r.density <= 1)).all())
    layers = rec.per_layer()
    assert [layer for layer, _ in layers] == list(range(LAYERS))
    assert all(isinstance(d, float) and 0 < d <= 1 for _, d in layers)
    assert rec.mean() == pytest.approx(sum(d for _, d in layers) / LAYERS)
    # Thresholds 0.8 skip some blocks of a random model (about 0.95 density here).
    assert rec.mean() < 1.0


def test_threshold_one_gives_full_density():
    model = _model(ONE_NAME)
    with torch.no_grad(), record_density() as rec:
        model(_prompt(128))
    assert len(rec) == LAYERS and not any(r.dense for r in rec.records)
    assert all(d == 1.0 for _, d in rec.per_layer())
    assert rec.mean() == 1.0


def test_dense_path_is_flagged():
    model = _model(FLOORED_NAME)
    with torch.no_grad(), record_density() as rec:
        model(_prompt(64))
    assert len(rec) == LAYERS
    assert all(r.dense for r in rec.records)
    assert rec.mean() == 1.0


def test_no_records_outside_the_context():
    model = _model(SPARSE_NAME)
    with torch.no_grad():
        with record_density() as rec:
            pass
        model(_prompt(64))
    assert len(rec) == 0 and rec.per_layer() == []
    with pytest.raises(ValueError, match="record_density"):
        rec.mean()


def test_nested_recorders_both_record():
    model = _model(SPARSE_NAME)
    with torch.no_grad(), record_density() as outer:
        model(_prompt(64))
        with record_density() as inner:
            model(_prompt(64))
    assert len(inner) == LAYERS and len(outer) == 2 * LAYERS
    for a, b in zip(inner.records, outer.records[LAYERS:]):
        assert (a.layer, a.q_len, a.kv_len, a.dense) == (b.layer, b.q_len, b.kv_len, b.dense)
        assert a.density is b.density


def test_layer_counter_without_layer_idx():
    # A module with no layer_idx: records are numbered by the recorder's call counter.
    from prism_flex.integrations.transformers import make_attention_function

    attn = make_attention_function(SPARSE, compiled=False)
    q = torch.randn(1, 4, 64, 32)
    k = torch.randn(1, 2, 64, 32)
    module = torch.nn.Module()
    with torch.no_grad(), record_density() as rec:
        for _ in range(3):
            out, _ = attn(module, q, k, k.clone(), None)
    assert out.shape == (1, 64, 4, 32)
    assert [r.layer for r in rec.records] == [0, 1, 2]
