"""Which layers carry an estimator's perplexity advantage: swap one layer at a time.

The model runs with estimator ``--base`` (default Prism) in every layer except one, which uses
``--other`` (default the XAttention-style estimator); the perplexity change of each single-layer
swap attributes the ``other - base`` gap to layers. Rows: ``{"swap_layer", "ppl"}`` plus the
all-base and all-other runs (``swap_layer`` = ``"none"`` / ``"all"``).

    python -m eval.layer_swap --length 4096 --threshold 0.9 --out bench/results/runs/x.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from eval import accuracy as A
from eval import estimators as E


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--text", default="austen:emma")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--base", default="prism", choices=["prism", "meanpool"])
    p.add_argument("--other", default="xattn", choices=["xattn"])
    p.add_argument("--layers", type=int, nargs="*", default=None, help="default: all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from prism_flex.data.texts import load_text
    from prism_flex.integrations.transformers import prism_mask, register

    tok, model = A.load_model(a.model, a.device)
    ids = tok(load_text(a.text), return_tensors="pt").input_ids[:, : a.length].to(a.device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = ALL_ATTENTION_FUNCTIONS[
        register(A.prism_cfg(a.base, a.threshold, head_dim, 128), "swap_base")
    ]
    other = E.make_xattn_attention_function(a.threshold)
    swapped: set = set()

    def mixed(module, *args, **kwargs):
        fn = other if getattr(module, "layer_idx", None) in swapped else base
        return fn(module, *args, **kwargs)

    AttentionInterface.register("swap_mixed", mixed)
    AttentionMaskInterface.register("swap_mixed", prism_mask)
    model.set_attn_implementation("swap_mixed")
    n_layers = cfg.num_hidden_layers
    layers = list(range(n_layers)) if a.layers is None else a.layers
    rows = []
    for label, chosen in [("none", set()), ("all", set(range(n_layers)))] + [
        (layer, {layer}) for layer in layers
    ]:
        swapped.clear()
        swapped.update(chosen)
        t0 = time.time()
        ppl = A.perplexity(model, ids)
        rows.append({"swap_layer": label, "ppl": ppl})
        A.log(f"swap {label}: ppl {ppl:.4f} ({time.time() - t0:.1f}s)")
        with open(a.out, "w") as f:
            json.dump(
                {
                    "model": a.model,
                    "L": a.length,
                    "threshold": a.threshold,
                    "base": a.base,
                    "other": a.other,
                    "device": a.device,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
