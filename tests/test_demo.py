"""`h1rl demo --quick` runs every phase end to end on the bundled teacher and writes its report and plots."""

from __future__ import annotations

import json

import pytest

from h1rl.demo import main


@pytest.mark.slow
def test_quick_demo_runs_every_phase(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", f"out_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(summary["accuracy"]) == {"teacher", "hybrid_distilled", "hybrid_grpo"}
    assert set(summary["sampled"]) == set(summary["accuracy"])  # pass@1 and pass@2 from 2 samples at T=1
    assert all(set(v) == {"pass@1", "pass@2"} for v in summary["sampled"].values())
    assert (out / "eval" / "hybrid_grpo_sampled.json").exists()
    assert summary["layout"].count("m2") >= 2
    assert summary["throughput"]["hybrid_tok_s"] > 0
    for name in ("report.md", "accuracy.png", "distill_kl.png", "grpo_reward.png", "resolved_config.yaml"):
        assert (out / name).exists(), name
    log = json.loads((out / "grpo" / "log_history.json").read_text())
    assert any("reward" in entry for entry in log)  # rewards were logged
    printed = capsys.readouterr().out
    assert "greedy accuracy" in printed and "pass@2 (n=2, T=1)" in printed
    # a second run finds every phase done and redoes nothing
    cached = [out / "eval" / name for name in ("hybrid_grpo.json", "hybrid_grpo_sampled.json")]
    stamps = [path.stat().st_mtime_ns for path in cached]
    assert main(["--quick", f"out_dir={out}"]) == 0
    assert [path.stat().st_mtime_ns for path in cached] == stamps
