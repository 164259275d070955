"""Caches whose key/value tensors outnumber the tokens seen (StaticCache) must answer right
or raise, never answer wrong.

transformers hands the mask function ``kv_length = max_cache_len`` for a StaticCache; Prism
aligns causality bottom-right, so the unwritten slots must never reach it as keys: eagerly the
mask function hands the attention the written keys only; traced, the mask is materialised and
only the dense path takes it. Tiny random Llama / Qwen2 / Qwen3 models on CPU, eager Prism.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, StaticCache  # noqa: E402

from prism_flex import PrismConfig  # noqa: E402
from prism_flex.integrations.transformers import (  # noqa: E402
    STATIC_CACHE_ERROR,
    prism_mask,
    register,
)

from .hf_models import FAMILIES, NO_DENSE_FLOOR  # noqa: E402
from .hf_models import tiny_model as _model  # noqa: E402
from .hf_models import tiny_prompt as _prompt  # noqa: E402

# The defaults: a 40-token prompt takes Prism's dense path.
DENSE_PATH = register(PrismConfig(), "prism_test_cache_dense_path", compiled=False)
# 16-token blocks and no floor: the sparse (selection) path on a 100-token prompt.
SPARSE_PATH = register(
    PrismConfig(block_size=16, **NO_DENSE_FLOOR), "prism_test_cache_sparse", compiled=False
)
EXACT = register(
    PrismConfig(high_threshold=1.0, low_threshold=1.0, **NO_DENSE_FLOOR),
    "prism_test_cache_exact",
    compiled=False,
)

# What the message must say: what is unsupported, and both ways out.
MESSAGE = r"StaticCache.*cache_implementation='static'.*dynamic cache.*attn_implementation='sdpa'"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, length", [(DENSE_PATH, 40), (SPARSE_PATH, 100), (EXACT, 100)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_generate_static_cache_equals_dynamic_cache(family, name, length, with_mask):
    """Eager: the mask function hands the attention the written keys only, so a StaticCache
    gives the dynamic cache's tokens (prefill on the sparse path included)."""
    model = _model(family, name)
    prompt = _prompt(length)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if with_mask:
        kwargs["attention_mask"] = torch.ones_like(prompt)
    with torch.no_grad():
        static = model.generate(prompt, cache_implementation="static", **kwargs)
        dynamic = model.generate(prompt, **kwargs)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_padded_batch_equals_dynamic_cache(family):
    model = _model(family, SPARSE_PATH)
    ids = _prompt(100, batch=2, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    ids[1, :37] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        static = model.generate(ids, cache_implementation="static", **kwargs)
        dynamic = model.generate(ids, **kwargs)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("family", FAMILIES)
def test_user_static_cache_prefill_and_decode_match_sdpa(family):
    model = _model(family, "sdpa")
    ids = _prompt(40)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=64)
        model(ids, past_key_values=cache)  # prefill with sdpa: the cache holds 40 of 64 slots
        want = model(ids[:, :1], past_key_values=cache).logits  # decode
        model.set_attn_implementation(EXACT)
        cache = StaticCache(config=model.config, max_cache_len=64)
        got_prefill = model(ids, past_key_values=cache).logits
        got = model(ids[:, :1], past_key_values=cache).logits
        model.set_attn_implementation("sdpa")
        want_prefill = model(
            ids, past_key_values=StaticCache(config=model.config, max_cache_len=64)
        )
    torch.testing.assert_close(got_prefill, want_prefill.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_full_static_cache_is_exact():
    """The rule is structural, not a type check: a StaticCache filled exactly by this forward
    has no unwritten slot, and Prism (threshold 1.0) matches sdpa."""
    model = _model("llama", "sdpa")
    ids = _prompt(48, seed=1)
    with torch.no_grad():
        want = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=48))
        model.set_attn_implementation(EXACT)
        got = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=48))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_compiled_static_cache_decode_dense_runs_sparse_asserts():
    """Under torch.compile the StaticCache's query offset is a traced tensor: the mask is
    materialised; a decoding step on the dense path applies it (equal to sdpa), one on the
    sparse path is refused by a run-time torch._assert_async (RuntimeError naming
    StaticCache), fullgraph included."""
    model = _model("llama", "sdpa")
    ids = _prompt(40)
    torch._dynamo.reset()
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=48)
        model(ids, past_key_values=cache)
        want = model(ids[:, :1], past_key_values=cache).logits
        cache = StaticCache(config=model.config, max_cache_len=48)
        model(ids, past_key_values=cache)
        model.set_attn_implementation(DENSE_PATH)
        forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
        got = forward(ids[:, :1], past_key_values=cache).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
        cache = StaticCache(config=model.config, max_cache_len=48)
        model.set_attn_implementation("sdpa")
        model(ids, past_key_values=cache)
        model.set_attn_implementation(SPARSE_PATH)
        forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
        with pytest.raises(RuntimeError, match="StaticCache"):
            forward(ids[:, :1], past_key_values=cache)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_cache_generate_matches_sdpa(family):
    """The default (dynamic) cache, explicitly, at threshold 1.0: prefill on the sparse path's
    code (dense_below=0) and decoding, token for token equal to sdpa."""
    prompt = _prompt(100, seed=2)
    model = _model(family, "sdpa")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="dynamic")
    with torch.no_grad():
        want = model.generate(prompt, **kwargs)
        model.set_attn_implementation(EXACT)
        got = model.generate(prompt, **kwargs)
        # A user-made DynamicCache too (prefill, then one decode step through the model).
        cache = DynamicCache()
        model(prompt, past_key_values=cache)
        step = model(want[:, 100:101], past_key_values=cache).logits
        model.set_attn_implementation("sdpa")
        cache = DynamicCache()
        model(prompt, past_key_values=cache)
        ref = model(want[:, 100:101], past_key_values=cache).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4)


def test_prism_mask_extent_rule():
    """prism_mask with the arguments transformers 5.x's create_causal_mask passes."""
    kw = dict(batch_size=1, kv_offset=0)
    # Dynamic cache: prefill, chunk continuing a cache, decode (q_offset an int).
    assert prism_mask(q_length=40, kv_length=40, q_offset=0, **kw) is None
    assert prism_mask(q_length=16, kv_length=56, q_offset=40, **kw) is None
    assert prism_mask(q_length=1, kv_length=57, q_offset=56, **kw) is None
    # StaticLayer: q_offset is its cumulative_length tensor, kv_length its max_cache_len.
    assert prism_mask(q_length=1, kv_length=48, q_offset=torch.tensor(47), **kw) is None
    # Not full: the ids of the written keys only, (B, 1, 1, written).
    got = prism_mask(q_length=1, kv_length=48, q_offset=torch.tensor(39), **kw)
    assert got.shape == (1, 1, 1, 40) and got.dtype == torch.int32 and bool((got == 0).all())
    got = prism_mask(q_length=40, kv_length=48, q_offset=0, **kw)  # uninitialised: offset 0
    assert got.shape == (1, 1, 1, 40)
    mask = torch.ones(1, 40)
    mask[0, :3] = 0
    got = prism_mask(q_length=40, kv_length=48, q_offset=0, attention_mask=mask, **kw)
    assert got[0, 0, 0].tolist() == [-1] * 3 + [0] * 37
    # A sliding-window (or custom) mask on an unfilled StaticCache still raises.
    from transformers.masking_utils import sliding_window_causal_mask_function

    with pytest.raises(NotImplementedError, match="48 key positions, 40 tokens seen"):
        prism_mask(
            q_length=40,
            kv_length=48,
            q_offset=0,
            mask_function=sliding_window_causal_mask_function(8),
            **kw,
        )
    assert STATIC_CACHE_ERROR.startswith("prism attention cannot run its sparse path")
