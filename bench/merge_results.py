"""Merge the JSON files of several ``bench.attention`` runs (one per shape, say, to fit the
GPU lease's 10-minute calls) into one results file and one speedup plot.

    python -m bench.merge_results a.json b.json --out bench/results/h200_attention.json \
        --plot bench/results/h200_speedup.png
"""

from __future__ import annotations

import argparse
import json
import types

import torch

from .attention import plot_speedups, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default="")
    p.add_argument("--markdown", default="", help="also write the README's tables here")
    a = p.parse_args()
    runs = [json.load(open(path)) for path in a.inputs]
    meta = {k: v for k, v in runs[0].items() if k not in ("rows", "settings", "dynamo", "total_s")}
    meta["runs"] = [
        {k: run.get(k) for k in ("date", "settings", "dynamo", "total_s")} for run in runs
    ]
    rows = [row for run in runs for row in run["rows"]]
    write_json(a.out, meta, rows)
    settings = types.SimpleNamespace(cuda=runs[0]["gpu"] != "cpu", device=torch.device("cpu"))
    plot_speedups(a.plot, rows, settings)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown_tables(rows))


def _ms(rows, shape, length, method):
    hit = [
        r
        for r in rows
        if (r["shape"], r["L"], r["method"]) == (shape, length, method) and r.get("ms") is not None
    ]
    return hit[0] if hit else None


def markdown_tables(rows: list[dict]) -> str:
    """Per shape and length: the dense baselines, Prism's three rows and the 10 % density row."""
    out = []
    sweep = [r for r in rows if r["run"] == "sweep"]
    for shape in dict.fromkeys(r["shape"] for r in sweep):
        out.append(f"\n**{shape}** (ms, median; speedup vs sdpa_flash / sdpa_cudnn)\n")
        out.append(
            "| L | sdpa_flash | sdpa_cudnn | flex_dense | prism_select | prism_sparse "
            "| prism_total | Prism density | select share | flex_density_0.1 |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for length in sorted({r["L"] for r in sweep if r["shape"] == shape}):
            get = lambda m: _ms(sweep, shape, length, m)  # noqa: E731
            total = get("prism_total")
            cells = [f"{length // 1024}K"]
            for m in ("sdpa_flash", "sdpa_cudnn", "flex_dense", "prism_select", "prism_sparse"):
                cells.append(f"{get(m)['ms']:.2f}" if get(m) else "-")
            cells.append(
                f"{total['ms']:.2f} ({total['speedup_vs_sdpa_flash']:.1f}x / "
                f"{total['speedup_vs_sdpa_cudnn']:.1f}x)"
                if total
                else "-"
            )
            cells.append(f"{total['density']:.3f}" if total else "-")
            cells.append(f"{get('prism_select')['ms'] / total['ms']:.0%}" if total else "-")
            cells.append(f"{get('flex_density_0.1')['ms']:.2f}" if get("flex_density_0.1") else "-")
            out.append("| " + " | ".join(cells) + " |")
    memory = [r for r in rows if r["run"] == "memory" and r.get("ms") is not None]
    if memory:
        out.append("\n**memory run** (llama shape, one call)\n")
        out.append("| L | method | ms | density | peak GiB | beyond inputs GiB |")
        out.append("|---|---|---|---|---|---|")
        for r in memory:
            out.append(
                f"| {r['L'] // 1024}K | {r['method']} | {r['ms']:.1f} | {r['density']:.3f} "
                f"| {r['peak_gib']:.2f} | {r['extra_gib']:.2f} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
