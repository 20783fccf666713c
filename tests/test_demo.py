"""`h1rl demo --quick` runs every phase end to end on the bundled teacher and writes its report and plots."""

from __future__ import annotations

import json

import pytest

from h1rl.demo import main
from h1rl.eval import read_results


@pytest.mark.slow
def test_quick_demo_runs_every_phase(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(summary["accuracy"]) == {"teacher", "hybrid_distilled", "hybrid_grpo"}
    assert set(summary["sampled"]) == set(summary["accuracy"])  # pass@1 and pass@2 from 2 samples at T=1
    assert all(set(v) == {"pass@1", "pass@2"} for v in summary["sampled"].values())
    assert (out / "eval" / "hybrid_grpo_sampled.json").exists()
    assert summary["layout"].count("m2") >= 2
    # distilled on the teacher's correct greedy solutions of the 64 training problems
    traces = summary["teacher_traces"]
    assert summary["distill_data"] == "teacher_traces" and 0 < traces["kept"] <= traces["problems"] == 64
    distill_rows = (out / "data" / "distill_teacher_traces.jsonl").read_text().splitlines()
    assert len(distill_rows) == traces["kept"]
    teacher_train = read_results(out / "eval" / "teacher_train.json")
    assert traces["kept"] == sum(p["correct"][0] for p in teacher_train["problems"])
    assert f"correct greedy solutions of {traces['kept']} of 64 training problems" in (out / "report.md").read_text()
    assert summary["throughput"]["hybrid_tok_s"] > 0
    for name in ("report.md", "accuracy.png", "distill_kl.png", "grpo_reward.png", "resolved_config.yaml"):
        assert (out / name).exists(), name
    log = json.loads((out / "grpo" / "log_history.json").read_text())
    assert any("reward" in entry for entry in log)  # rewards were logged
    printed = capsys.readouterr().out
    assert "greedy accuracy" in printed and "pass@2 (n=2, T=1)" in printed
    # a second run finds every phase done and redoes nothing
    cached = [out / "eval" / name for name in ("hybrid_grpo.json", "hybrid_grpo_sampled.json", "teacher_train.json")]
    stamps = [path.stat().st_mtime_ns for path in cached]
    assert main(["--quick", "--output_dir", str(out)]) == 0
    assert [path.stat().st_mtime_ns for path in cached] == stamps


def test_report_with_greedy_evaluation_only(tmp_path, capsys):
    from h1rl.demo import print_summary, write_report

    summary = {
        "layout": ["t", "m2"],
        "accuracy": {"teacher": 0.5, "hybrid_distilled": 0.4, "hybrid_grpo": 0.45},
        "throughput": {"hybrid_tok_s": 2.0, "teacher_tok_s": 1.0, "speedup": 2.0},
        "timings": {"distill_s": 1.0, "total_s": 2.0},
        "stages": [{"stage": 1, "layout": ["t", "m2"], "metrics": {"kl_after_swap": 0.3, "kl_after_distill": 0.1}}],
    }
    write_report(tmp_path, summary, [{"reward": 0.1}, {"reward": 0.3}])
    report = (tmp_path / "report.md").read_text()
    assert "| model | greedy accuracy |" in report and "pass@" not in report
    assert "| hybrid after distillation (t,m2) | 0.400 |" in report
    assert (tmp_path / "accuracy.png").exists()
    print_summary(summary)
    printed = capsys.readouterr().out.splitlines()
    assert printed[3].split() == ["teacher", "(transformer)", "0.500"] and not any(p != p.rstrip() for p in printed)


@pytest.mark.slow
def test_cached_evaluation_is_redone_when_its_settings_change(tmp_path):
    from h1rl.assets import teacher_dir
    from h1rl.config_io import load_config
    from h1rl.data import make_splits
    from h1rl.demo import DemoConfig, evaluate_once
    from h1rl.recipes import find

    cfg = load_config(DemoConfig, find("demo_quick"), [f"output_dir={tmp_path}", "sampled_eval=null"])
    rows = make_splits(0, 3, 3, 0)["test"]
    path = tmp_path / "eval" / "teacher.json"
    first = evaluate_once("teacher", str(teacher_dir()), rows, cfg)["greedy"]
    stamp = path.stat().st_mtime_ns
    assert evaluate_once("teacher", str(teacher_dir()), rows, cfg)["greedy"] == first  # read back
    assert path.stat().st_mtime_ns == stamp
    cfg.eval.max_completion_length = 8
    again = evaluate_once("teacher", str(teacher_dir()), rows, cfg)["greedy"]
    assert again["config"]["max_completion_length"] == 8 and path.stat().st_mtime_ns != stamp
    stamp = path.stat().st_mtime_ns
    other = make_splits(0, 4, 3, 0)["test"]  # other problems (a changed task): evaluated again
    assert evaluate_once("teacher", str(teacher_dir()), other, cfg)["greedy"]["num_problems"] == 4
    assert path.stat().st_mtime_ns != stamp


def test_distillation_data_choice(tmp_path):
    from h1rl.config_io import load_config
    from h1rl.demo import DemoConfig, resolve
    from h1rl.recipes import find

    for choice in ("teacher_traces", "solutions"):
        cfg = resolve(load_config(DemoConfig, find("demo_quick"), [f"output_dir={tmp_path}",
                                                                              f"distill_data={choice}"]))
        assert cfg.distill.data.dataset_name == str(tmp_path / "data" / f"distill_{choice}.jsonl")
    with pytest.raises(ValueError, match="distill_data: expected one of teacher_traces, solutions, got 'gold'"):
        load_config(DemoConfig, find("demo_quick"), ["distill_data=gold"])


def test_old_names_name_the_new_ones(capsys):
    """`out_dir` became `output_dir` (TRL's name, as in every h1rl config); the old key fails naming the new one."""
    from h1rl.config_io import ConfigError, load_config
    from h1rl.demo import DemoConfig
    from h1rl.recipes import find

    with pytest.raises(ConfigError, match="key 'out_dir' was renamed 'output_dir'"):
        load_config(DemoConfig, find("demo_quick"), ["out_dir=x"])
    with pytest.raises(ConfigError, match="key 'distill.data.path' was renamed 'distill.data.dataset_name'"):
        load_config(DemoConfig, find("demo_quick"), ["distill.data.path=x"])
    with pytest.raises(ConfigError, match="key 'eval.max_new_tokens' was renamed 'eval.max_completion_length'"):
        load_config(DemoConfig, find("demo_quick"), ["eval.max_new_tokens=8"])
    with pytest.raises(ValueError, match="teacher: 'auto' is now 'bundled'"):
        load_config(DemoConfig, find("demo_quick"), ["teacher=auto"])
    with pytest.raises(SystemExit) as exited:
        main(["--quick", "--out_dir", "x"])
    assert exited.value.code == 2 and "was renamed 'output_dir'" in capsys.readouterr().err
