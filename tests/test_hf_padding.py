"""Hugging Face: padded batched generate and packed sequences (position_ids), on tiny random
Llama / Qwen2 / Qwen3 models, eager Prism (CPU)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prism_flex import PrismConfig  # noqa: E402
from prism_flex.integrations.transformers import prism_mask, register  # noqa: E402

from .hf_models import FAMILIES, NO_DENSE_FLOOR  # noqa: E402
from .hf_models import tiny_model as _model  # noqa: E402
from .hf_models import tiny_prompt as _prompt  # noqa: E402

# Threshold 1.0 on the selection path: exactly dense attention with the padding mask.
EXACT = register(
    PrismConfig(high_threshold=1.0, low_threshold=1.0, block_size=16, **NO_DENSE_FLOOR),
    "prism_test_pad_exact",
    compiled=False,
)
# The default config: these short prompts take its dense path (SDPA with the mask).
DEFAULT = register(PrismConfig(), "prism_test_pad_default", compiled=False)
# Sparse selection (default thresholds) with 16-token blocks.
SPARSE = register(
    PrismConfig(block_size=16, **NO_DENSE_FLOOR), "prism_test_pad_sparse", compiled=False
)


def _left_padded(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1] :] = p[0]
        mask[i, width - p.shape[1] :] = 1
    return ids, mask


def _generate(model, ids, mask=None):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name, lengths",
    [
        (EXACT, [37, 21, 50]),
        (DEFAULT, [37, 21, 50]),
        # Left padding by whole blocks: each row selects what its prompt selects alone.
        (SPARSE, [80, 48, 64]),
    ],
)
def test_left_padded_generate_equals_per_prompt_generate(family, name, lengths):
    model = _model(family, name)
    prompts = [_prompt(n, seed=i + 1) for i, n in enumerate(lengths)]
    ids, mask = _left_padded(prompts)
    batched = _generate(model, ids, mask)
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        alone = _generate(model, p)
        assert torch.equal(batched[i, width:], alone[0, p.shape[1] :]), (family, name, i)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_forward_matches_sdpa(family):
    """The padded prefill's logits at the real tokens equal SDPA's (threshold 1.0)."""
    ids, mask = _left_padded([_prompt(45, seed=1), _prompt(30, seed=2)])
    prism = _model(family, EXACT)
    sdpa = _model(family, "sdpa")
    with torch.no_grad():
        a = prism(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", [EXACT, SPARSE])
def test_packed_position_ids_equal_separate_forwards(family, name):
    """One row of documents packed with restarting position_ids (use_cache=False, as in
    training / DataCollatorWithFlattening) gives each document's own logits; with 16-token
    blocks and block-aligned documents also on the sparse path."""
    _assert_packed_equals_separate(_model(family, name), [32, 48, 16], seed=10)


def _assert_packed_equals_separate(model, lengths, seed):
    docs = [_prompt(n, seed=seed + i) for i, n in enumerate(lengths)]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), position_ids=pos, use_cache=False).logits
        start = 0
        for d in docs:
            alone = model(d, use_cache=False).logits
            n = d.shape[1]
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_long_documents_equal_separate_forwards(family):
    """Documents long enough to run one attention call each (pipeline.SPLIT_MIN_BLOCKS blocks
    of 16 tokens on average), not block-aligned: each document's own logits."""
    _assert_packed_equals_separate(_model(family, SPARSE), [1100, 1000, 1200], seed=20)


def test_prism_mask_forms():
    """What the mask function hands the attention: None without padding, int32 ids with it
    (-1 = padding), the packed documents for a packed mask function."""
    from transformers import masking_utils
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        sliding_window_causal_mask_function,
    )

    assert prism_mask(2, 8, 8, attention_mask=torch.ones(2, 8, dtype=torch.long)) is None
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    got = prism_mask(2, 8, 8, attention_mask=mask)
    assert got.shape == (2, 1, 1, 8)
    got = got[:, 0, 0]
    assert got.dtype == torch.int32 and got.tolist()[1] == [-1, -1, -1, 0, 0, 0, 0, 0]
    assert got.tolist()[0] == [0] * 8
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    psm = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    # transformers 5.17 composes causal and packed; 5.25 remaps the causal part's positions
    # (same rule): both are taken.
    packed = packed_sequence_mask_function(psm)
    forms = [and_masks(causal_mask_function, packed)]
    remap = getattr(masking_utils, "remap_positions_for_packed_sequence", None)
    if remap is not None:
        forms.append(and_masks(remap(causal_mask_function, pos), packed))
    for fn in forms:
        got = prism_mask(1, 8, 8, mask_function=fn)
        assert got[:, 0, 0].tolist() == psm.tolist()
        assert got._prism_num_docs == 3 and got._prism_lengths == (3, 2, 3)  # once per forward
    # Another composition is not taken for packing: it is materialised (and then checked).
    other = and_masks(sliding_window_causal_mask_function(2), packed_sequence_mask_function(psm))
    assert prism_mask(1, 8, 8, mask_function=other).dtype == torch.bool


def test_sliding_window_error_names_the_layer():
    model = _model("qwen2", EXACT, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with torch.no_grad(), pytest.raises(NotImplementedError) as err:
        model(_prompt(40))
    text = str(err.value)
    assert "layer 1" in text and "'sliding_attention'" in text and "sliding_window=16" in text
    assert "use_sliding_window=False" in text and "sdpa" in text


def test_padded_forward_inside_torch_compile():
    """A user's torch.compile of the model (fullgraph): the padding ids are made in the graph
    and cross into Prism's custom op; the default config's dense path there equals sdpa."""
    name = register(PrismConfig(), "prism_test_pad_traced")
    ids, mask = _left_padded([_prompt(45, seed=1), _prompt(30, seed=2)])
    model = _model("qwen2", "sdpa")
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(name)
        forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
        got = forward(ids, attention_mask=mask).logits
    torch._dynamo.reset()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
