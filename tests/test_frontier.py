"""eval/frontier.py end to end on the tiny random Qwen2 model (CPU, eager), and resume."""

import json

import pytest

pytest.importorskip("transformers")


def test_frontier_smoke_and_resume(tmp_path, capsys):
    from eval import frontier

    out = tmp_path / "f.json"
    argv = [
        "--random-tiny",
        "--device",
        "cpu",
        "--length",
        "1100",
        "--jobs",
        "dense",
        "prism:0.8",
        "flashprefill:0.3",
        "--tasks",
        "ppl",
        "needle",
        "multikey",
        "--samples",
        "1",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    result = frontier.main(argv)
    rows = result["rows"]
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("dense", None),
        ("prism", 0.8),
        ("flashprefill", 0.3),
    ]
    for r in rows:
        assert r["ppl"] > 1 and 0 < r["density"] <= 1 and r["time_median_ms"] > 0
        assert 0 <= r["needle"] <= 1 and 0 <= r["multikey"] <= 1 and "vartrack" not in r
    assert rows[0]["density"] == 1.0 and rows[0]["speedup_vs_dense"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["meta"]["length"] == 1100 and saved["meta"]["torch"]
    assert "| flashprefill | 0.3 |" in out.with_suffix(".md").read_text()
    # resume: nothing left to run
    again = frontier.main(argv + ["--resume"])
    assert len(again["rows"]) == 3
    assert "skipped (--resume)" in capsys.readouterr().err


def test_job_list():
    from eval import frontier

    args = frontier.parse_args(["--quick", "--device", "cpu"])
    jobs = frontier.job_list(args)
    assert jobs[0] == ("dense", None) and ("flashprefill", 0.05) in jobs and args.samples == 5
    full = frontier.job_list(frontier.parse_args(["--device", "cpu"]))
    assert len(full) == 15
    for bad in (["nope:1"], ["prism"], ["dense:0.5"]):
        with pytest.raises(SystemExit):
            frontier.job_list(frontier.parse_args(["--device", "cpu", "--jobs", *bad]))


def test_accuracy_methods_of_the_frontier():
    from eval import accuracy

    cfg = accuracy.prism_cfg("prism_rel", 0.1, 64, 128)
    assert cfg.relative_cut == 0.1 and cfg.high_threshold == 0.95 and cfg.local_blocks == 1
    assert accuracy.prism_cfg("prism_local", 0.9, 64, 128).relative_cut is None
    assert {"flashprefill", "prism_rel"} <= set(accuracy.SPARSE)


def test_plot_from_saved_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from eval import frontier

    rows = [
        dict(L=1024, method="dense", setting=None, ppl=10.0, time_median_ms=5.0),
        dict(L=1024, method="prism", setting=0.9, ppl=10.5, time_median_ms=3.0),
        dict(L=1024, method="prism", setting=0.8, ppl=11.0, time_median_ms=2.0),
        dict(L=2048, method="flashprefill", setting=0.05, ppl=12.0, time_median_ms=4.0),
    ]
    saved = tmp_path / "a.json"
    saved.write_text(json.dumps(dict(meta={}, rows=rows)))
    frontier.main(["--plot-only", str(saved), "--out", str(tmp_path / "fig.json")])
    assert (tmp_path / "fig.png").stat().st_size > 0
