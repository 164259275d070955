"""The Hugging Face transformers integration (prism_flex.integrations.transformers), on CPU.

Tiny randomly initialised Llama / Qwen2 / Qwen3 models (4 query heads, 2 KV heads, head dim 32:
one shape class for every family, so the compiled stages compile once per query-length class).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")


from prism_flex import PrismConfig  # noqa: E402
from prism_flex.integrations.transformers import register  # noqa: E402

from .hf_models import NO_DENSE_FLOOR  # noqa: E402
from .hf_models import tiny_model as _model  # noqa: E402
from .hf_models import tiny_prompt as _prompt  # noqa: E402

DENSE = PrismConfig(high_threshold=1.0, low_threshold=1.0, **NO_DENSE_FLOOR)
SPARSE = PrismConfig(**NO_DENSE_FLOOR)  # default thresholds 0.95
# Eager Prism (compiled=False): the adapter is what these tests check; compiling the stages on
# CPU costs ~20-40 s per query-length class, and compiled == eager is tests/test_compiled.py's job.
DENSE_NAME = register(DENSE, "prism_test_dense", compiled=False)
SPARSE_NAME = register(SPARSE, "prism_test_sparse", compiled=False)


def test_4d_padded_mask_raises_2d_padding_runs():
    """The 2-D attention_mask (padding) is honoured (tests/test_hf_padding.py checks its
    results); a 4-D mask other than plain causal still reaches the attention function's own
    check and raises."""
    model = _model("llama", DENSE_NAME)
    ids = _prompt(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        model(ids, attention_mask=mask)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    padded = causal.expand(2, 1, 40, 40).clone()
    padded[1, :, :, :5] = False
    with torch.no_grad(), pytest.raises(NotImplementedError, match="does not support this mask"):
        model(ids, attention_mask=padded)
    # The unpadded forms agree: no mask, an all-ones 2-D mask, the plain causal 4-D mask.
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, attention_mask=torch.ones_like(ids)).logits
        c = model(ids, attention_mask=causal.expand(2, 1, 40, 40)).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_register_is_idempotent():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert register(DENSE, "prism_test_dense", compiled=False) == DENSE_NAME
    fn = ALL_ATTENTION_FUNCTIONS[DENSE_NAME]
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[DENSE_NAME]
    assert register(DENSE, "prism_test_dense", compiled=False) == DENSE_NAME
    assert ALL_ATTENTION_FUNCTIONS[DENSE_NAME] is fn
    assert ALL_MASK_ATTENTION_FUNCTIONS[DENSE_NAME] is mask_fn
    assert fn.prism_config == DENSE
    assert register() == "prism"
    assert register() == "prism"
    with pytest.raises(ValueError):
        register(name="sdpa")
    # transformers would try to load any name containing "flash" as a hub kernel
    with pytest.raises(ValueError, match="without it"):
        register(PrismConfig(flex_backend="flash"), "prism_flash")


def test_import_does_not_import_transformers():
    code = (
        "import sys, prism_flex, prism_flex.integrations; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prism_config_kwarg_overrides_registered_config():
    """A forward's ``prism_config=`` kwarg reaches the attention function and wins over the
    registered config. Also runs outside ``torch.no_grad()`` (parameters require grad)."""
    ids = _prompt(640, seed=2)
    model = _model("qwen3", SPARSE_NAME)
    tight_cfg = PrismConfig(high_threshold=0.05, low_threshold=0.05, **NO_DENSE_FLOOR)
    with torch.no_grad():
        dense = model(ids, prism_config=DENSE).logits
        tight = model(ids, prism_config=tight_cfg).logits
    with warnings.catch_warnings():
        # prism_attention may warn that inputs requiring grad run dense (inference only).
        warnings.simplefilter("ignore")
        with_grad = model(ids, prism_config=DENSE).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(dense, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_grad.detach(), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tight, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compiles the Prism stages on CPU (~50 s cold)
def test_compiled_prism_through_the_model():
    """One forward through the default (compiled) path: one query-length class, one compile."""
    compiled_name = register(SPARSE, "prism_test_compiled")
    ids = _prompt(300, seed=3)
    model = _model("llama", compiled_name)
    with torch.no_grad():
        got = model(ids).logits
        model.set_attn_implementation(SPARSE_NAME)
        want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("q_len", [1, 37, 64])
def test_short_call_path_equals_prism_attention(q_len):
    """The attention function's path for short unmasked calls (one SDPA call, the host-bound
    case) gives exactly what prism_attention's dense path gives, with and without a cache
    (Lq < Lkv), and the forms with a mask or with grad still take the full path."""
    from prism_flex import prism_attention
    from prism_flex.integrations.transformers import make_attention_function

    class Module(torch.nn.Module):
        is_causal, layer_idx = True, 0

    fn = make_attention_function(PrismConfig(), compiled=False)  # 64 tokens: dense by size
    gen = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 4, q_len, 32, generator=gen)
    k, v = torch.randn(2, 2, 64, 32, generator=gen), torch.randn(2, 2, 64, 32, generator=gen)
    with torch.no_grad():
        got, weights = fn(Module(), q, k, v, None, scaling=0.3)
        want = prism_attention(q, k, v, PrismConfig(), scale=0.3, compiled=False)
    assert weights is None
    assert got.shape == (2, q_len, 4, 32) and got.is_contiguous()
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=0, atol=0)
    q.requires_grad_(True)
    with pytest.warns(UserWarning, match="inference only"):
        fn(Module(), q, k, v, None, scaling=0.3)
