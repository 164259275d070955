"""RoPE scaling of a loaded Hugging Face model, for lengths past its trained context.

``--rope-scaling yarn:4`` (eval/accuracy.py, eval/frontier.py, bench/ttft.py) sets YaRN with
factor 4 over ``original_max_position_embeddings = 32768``, as Qwen documents for its 32K
models (Qwen2.5 model cards: ``"rope_scaling": {"type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 32768}``), then rebuilds the model's rotary embeddings.
``yarn:FACTOR:ORIGINAL`` sets the original length too (the tests use a small one).

transformers 5 keeps the RoPE settings in ``config.rope_parameters`` (a dict with
``rope_type``, ``rope_theta`` and the type's fields; ``rope_scaling`` is its old name) and
computes the inverse frequencies once, when the rotary module is built
(``<Family>RotaryEmbedding(config)``, ``transformers.modeling_rope_utils``): changing the
config of a loaded model changes nothing until that module is rebuilt, which is what
:func:`apply_rope_scaling` does. YaRN there is static: the same frequencies at every length
(short inputs change too, as Qwen's cards warn).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["parse_rope_scaling", "apply_rope_scaling"]

#: Qwen2.5's trained context, the default original length of ``yarn:FACTOR``.
QWEN_ORIGINAL_CONTEXT = 32768


def parse_rope_scaling(spec: Optional[str]) -> Optional[dict]:
    """``"yarn:4"`` -> ``{"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 32768}``; ``"yarn:4:1024"`` sets the original length;
    ``None`` or ``"none"`` -> ``None``. Raises ``ValueError`` otherwise."""
    if spec is None or spec == "none":
        return None
    parts = spec.split(":")
    try:
        if parts[0] != "yarn" or len(parts) not in (2, 3):
            raise ValueError
        factor = float(parts[1])
        original = int(parts[2]) if len(parts) == 3 else QWEN_ORIGINAL_CONTEXT
    except ValueError:
        raise ValueError(
            f"--rope-scaling: expected yarn:FACTOR or yarn:FACTOR:ORIGINAL_LENGTH (e.g. yarn:4), "
            f"got {spec!r}"
        ) from None
    if not factor > 1.0 or original < 1:
        raise ValueError(f"--rope-scaling: need a factor > 1 and a positive length, got {spec!r}")
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}


def apply_rope_scaling(model, spec: Optional[str]) -> Optional[dict]:
    """Set the RoPE scaling ``spec`` (:func:`parse_rope_scaling`) on a loaded causal LM:
    ``config.rope_parameters`` gains it (``rope_theta`` kept), ``max_position_embeddings``
    becomes ``factor x original``, and every rotary embedding module of the model is rebuilt
    from the new config on its device. Returns the parameters set (``None``: nothing done)."""
    scaling = parse_rope_scaling(spec)
    if scaling is None:
        return None
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.update(scaling)
    config.rope_parameters = params
    original = scaling["original_max_position_embeddings"]
    config.max_position_embeddings = int(scaling["factor"] * original)
    rebuilt = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and hasattr(child, "rope_type"):
                new = type(child)(config)
                setattr(parent, name, new.to(child.inv_freq.device))
                rebuilt += 1
    if not rebuilt:
        raise RuntimeError(f"no rotary embedding module found in {type(model).__name__}")
    return params
