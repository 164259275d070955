"""eval/rope.py: --rope-scaling yarn:F[:ORIGINAL] on a tiny Qwen2 model (CPU)."""

import pytest
import torch

pytest.importorskip("transformers")

from eval.rope import apply_rope_scaling, parse_rope_scaling  # noqa: E402

from .hf_models import tiny_model, tiny_prompt  # noqa: E402


def test_parse():
    assert parse_rope_scaling("yarn:4") == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    assert parse_rope_scaling("yarn:2:1024")["original_max_position_embeddings"] == 1024
    assert parse_rope_scaling(None) is None and parse_rope_scaling("none") is None
    for bad in ("yarn", "linear:4", "yarn:x", "yarn:0.5", "yarn:4:1:2"):
        with pytest.raises(ValueError, match="rope-scaling"):
            parse_rope_scaling(bad)


def test_yarn_changes_the_rotary_frequencies_and_the_outputs():
    model = tiny_model("qwen2", "sdpa")
    ids = tiny_prompt(64)
    rot = model.model.rotary_emb
    before_freq, before_scale = rot.inv_freq.clone(), rot.attention_scaling
    with torch.no_grad():
        before = model(ids).logits
    params = apply_rope_scaling(model, "yarn:4:1024")
    rot = model.model.rotary_emb
    assert params["rope_type"] == "yarn" and params["rope_theta"] == 10000.0
    assert model.config.max_position_embeddings == 4096
    # YaRN: the high frequencies (first pairs) kept, the low ones divided by the factor,
    # cos/sin scaled by 0.1 ln(4) + 1
    assert torch.allclose(rot.inv_freq[0], before_freq[0])
    assert torch.allclose(rot.inv_freq[-1], before_freq[-1] / 4)
    assert rot.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert before_scale == 1.0
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)
    assert apply_rope_scaling(model, None) is None
