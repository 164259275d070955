"""bench.ttft on CPU: the tiny random Qwen2 model, two lengths (dense path and Prism's
selection path), one rep: a few seconds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from bench import ttft  # noqa: E402


def test_tiny_random_rows(tmp_path, capsys):
    out = tmp_path / "ttft.json"
    # 1152 >= PrismConfig().dense_below, so Prism selects blocks there (eager on CPU).
    ttft.main(["--random-tiny", "--device", "cpu", "--lengths", "64", "1152", "--reps", "2",
               "--warmup", "0", "--methods", "sdpa_flash", "prism", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["method"], r["L"]) for r in rows] == [
        ("sdpa_flash", 64), ("sdpa_flash", 1152), ("prism", 64), ("prism", 1152)]
    for r in rows:
        assert r["status"] == "ok" and r["model"] == "random-tiny-qwen2"
        assert len(r["times_ms"]) == 2 and 0 < r["min_ms"] <= r["median_ms"]
        assert r["first_call_ms"] > 0 and r["graphs_timed"] >= 0
        assert r["speedup_vs_sdpa_flash"] > 0 and r["speedup_vs_sdpa_cudnn"] is None
        assert r["cold"] == (r["L"] == 64)
    assert all(0 < r["density"] <= 1 for r in rows if r["method"] == "prism")
    assert data["meta"]["input"] == "random:seed=0"
    assert data["meta"]["args"]["lengths"] == [64, 1152]
    printed = capsys.readouterr().out
    assert "| random-tiny-qwen2 | prism | 1152 |" in printed
    assert "prism: graphs compiled at lengths after the first:" in printed


def test_merge_keeps_other_rows(tmp_path):
    out = tmp_path / "ttft.json"
    common = ["--random-tiny", "--device", "cpu", "--lengths", "64", "--reps", "1",
              "--warmup", "0", "--out", str(out)]
    ttft.main(common + ["--methods", "sdpa_cudnn"])
    ttft.main(common + ["--methods", "sdpa_flash", "--merge"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["sdpa_cudnn", "sdpa_flash"]
    assert rows[1]["speedup_vs_sdpa_cudnn"] > 0  # computed across the merged runs
