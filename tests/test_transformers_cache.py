"""Caches whose key/value tensors outnumber the tokens seen (StaticCache) must raise, not answer.

transformers hands the mask function ``kv_length = max_cache_len`` for a StaticCache; Prism
aligns causality bottom-right, so without the check the unwritten slots would be attended as
the newest keys (a silent wrong answer). Tiny random Llama / Qwen2 models on CPU, eager Prism.
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
@pytest.mark.parametrize("name, length", [(DENSE_PATH, 40), (SPARSE_PATH, 100)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_generate_static_cache_raises(family, name, length, with_mask):
    model = _model(family, name)
    prompt = _prompt(length)
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
    if with_mask:
        kwargs["attention_mask"] = torch.ones_like(prompt)
    with torch.no_grad(), pytest.raises(NotImplementedError, match=MESSAGE):
        model.generate(prompt, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_user_static_cache_raises_in_prefill_and_decode(family):
    model = _model(family, "sdpa")
    ids = _prompt(40)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(ids, past_key_values=cache)  # prefill with sdpa: the cache holds 40 of 64 slots
        model.set_attn_implementation(SPARSE_PATH)
        with pytest.raises(NotImplementedError, match=r"64 key positions, 41 tokens seen"):
            model(ids[:, :1], past_key_values=cache)  # decode
        with pytest.raises(NotImplementedError, match=MESSAGE):
            model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=64))


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


def test_compiled_static_cache_decode_asserts():
    """Under torch.compile the StaticCache's query offset is a traced tensor: the check is a
    run-time torch._assert_async (RuntimeError with the same message), fullgraph included."""
    model = _model("llama", "sdpa")
    ids = _prompt(40)
    cache = StaticCache(config=model.config, max_cache_len=48)
    torch._dynamo.reset()
    with torch.no_grad():
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
    with pytest.raises(NotImplementedError, match="48 key positions, 40 tokens seen"):
        prism_mask(q_length=1, kv_length=48, q_offset=torch.tensor(39), **kw)
    with pytest.raises(NotImplementedError, match="48 key positions, 40 tokens seen"):
        prism_mask(q_length=40, kv_length=48, q_offset=0, **kw)  # uninitialised: offset 0
    with pytest.raises(NotImplementedError, match="48 key positions, 40 tokens seen"):
        prism_mask(q_length=40, kv_length=48, q_offset=0, attention_mask=torch.ones(1, 40), **kw)
    assert STATIC_CACHE_ERROR.startswith("prism attention does not support")
