"""Tensor parallelism through transformers (``tp_plan="auto"``) on 2 CPU ranks (gloo).

What transformers (5.x) hands the attention function under TP, read off
``transformers/distributed/tensor_parallel.py`` and checked here: q/k/v/o projections are
``colwise``/``rowwise``; in inference (and also with grad) the colwise projections return the
rank's *local* slice as a plain tensor, so the attention function gets plain tensors with the
rank's heads only, ``Hq / W`` query heads and ``Hkv / W`` KV heads (a GQA group stays on one
rank: query heads ``[r Hq/W, (r+1) Hq/W)`` read KV heads ``[r Hkv/W, (r+1) Hkv/W)``), K/V not
repeated. Prism then runs per rank on those heads with no communication of its own (the
selection is per head). A model whose KV heads do not divide by W fails inside transformers'
own projection reshape, whatever the attention implementation.

Checks per family (Llama, Qwen2, Qwen3; tiny random models saved with save_pretrained): every
call sees the local head counts and runs the sparse path; the per-head block masks of every
layer equal the single-process model's masks of those heads exactly; the logits equal the
single-process ones within rounding; at threshold 1.0 they equal the single-process SDPA
model's.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prism_flex import PrismConfig, prism_block_mask  # noqa: E402

from .distributed import spawn  # noqa: E402
from .hf_models import FAMILIES, NO_DENSE_FLOOR, tiny_model, tiny_prompt  # noqa: E402

# Thresholds 0.5: a random model is flat; at 0.95 its 256-token prompt keeps every block
# (density 0.8 at 0.5, block size 16).
SPARSE = PrismConfig(**NO_DENSE_FLOOR, block_size=16, high_threshold=0.5, low_threshold=0.5)
ONE = PrismConfig(**NO_DENSE_FLOOR, block_size=16, high_threshold=1.0, low_threshold=1.0)
LENGTH = 256


def _spy(config, name, calls):
    """Register ``name``: Prism (eager) that also records, per call, the head counts and the
    block table of the call's own inputs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from prism_flex.integrations.transformers import make_attention_function, prism_mask

    prism = make_attention_function(config, compiled=False)

    def attention(module, query, key, value, attention_mask, **kwargs):
        table = prism_block_mask(query, key, config, compiled=False).to_dense()
        calls.append((type(query), query.shape[1], key.shape[1], table))
        return prism(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, prism_mask)
    return name


def _forward(model, ids):
    from prism_flex.integrations.transformers import record_density

    with torch.no_grad(), record_density() as rec:
        logits = model(ids).logits
    return logits, rec.records


def _tp_rank(rank, world, paths):
    from transformers import AutoModelForCausalLM

    ids = tiny_prompt(LENGTH)
    for family, path in paths.items():
        for config in (SPARSE, ONE):
            single_calls, tp_calls = [], []
            single_name = _spy(config, f"prism_single_{family}", single_calls)
            tp_name = _spy(config, f"prism_tp_{family}", tp_calls)
            single = AutoModelForCausalLM.from_pretrained(path, attn_implementation=single_name)
            tp = AutoModelForCausalLM.from_pretrained(
                path, tp_plan="auto", attn_implementation=tp_name
            )
            assert tp.tp_size == world
            want, want_records = _forward(single.eval(), ids)
            got, got_records = _forward(tp.eval(), ids)
            hq, hkv = single.config.num_attention_heads, single.config.num_key_value_heads
            heads = slice(rank * hq // world, (rank + 1) * hq // world)
            assert len(tp_calls) == len(single_calls) == single.config.num_hidden_layers
            for (kind, lq, lk, table), (_, _, _, whole) in zip(tp_calls, single_calls):
                # Plain local tensors, the rank's heads, K/V not repeated.
                assert kind is torch.Tensor
                assert (lq, lk) == (hq // world, hkv // world)
                assert torch.equal(table, whole[:, heads]), family
            for got_r, want_r in zip(got_records, want_records):
                assert not got_r.dense
                assert torch.equal(got_r.density, want_r.density[:, heads])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            if config is ONE:
                sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
                torch.testing.assert_close(got, _forward(sdpa.eval(), ids)[0], atol=1e-4, rtol=1e-4)
            else:
                density = torch.stack([r.density for r in want_records])
                assert float(density.mean()) < 0.9, "the test input selects every block"


def test_tensor_parallel_transformers(tmp_path):
    paths = {}
    for family in FAMILIES:
        path = tmp_path / family
        tiny_model(family, "sdpa").save_pretrained(path)
        paths[family] = str(path)
    spawn(_tp_rank, 2, paths)


def _bench_smoke(rank, world, path, out):
    from bench import tp_prefill

    tp_prefill.main(
        ["--model-path", path, "--lengths", "256", "--reps", "1", "--eager", "--dtype"]
        + ["float32", "--config", "dense_below=0", "sparse_min_flops=0", "block_size=16"]
        + ["high_threshold=0.5", "low_threshold=0.5"]
        + ["--out", out]
    )


def test_bench_tp_prefill_smoke(tmp_path):
    """bench/tp_prefill.py (the multi-GPU TP benchmark) runs on 2 gloo ranks, tiny model."""
    import json

    path, out = tmp_path / "llama", tmp_path / "tp.json"
    tiny_model("llama", "sdpa").save_pretrained(path)
    spawn(_bench_smoke, 2, str(path), str(out))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert [(r["method"], r["length"]) for r in result["rows"]] == [("sdpa", 256), ("prism", 256)]
    assert 0 < result["rows"][1]["density"] < 1
