"""`h1rl distill` end to end on the bundled teacher: staged layouts, KL drops, manifests, resume, bad schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, TrainerCallback

from h1rl.config_io import ConfigError, load_config
from h1rl.distill.config import DistillConfig
from h1rl.distill.run import import_eval_fn, main, run_distillation


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Raises after `step` optimizer steps of the stage whose directory is `stage` (a crash mid-stage)."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == self.stage and state.global_step == self.step:
            raise Interrupted(f"{self.stage} step {self.step}")


class RecordStarts(TrainerCallback):
    """Records (stage directory, global step) at each stage's train start."""

    def __init__(self):
        self.starts: list[tuple[str, int]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.starts.append((Path(args.output_dir).name, state.global_step))


@pytest.mark.slow
def test_two_stage_distillation_via_cli(write_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe([{"name": "loo", "scorer": "loo", "num_layers": 2, "max_steps": 30},
                           {"name": "mmr", "scorer": "mmr", "num_layers": 1, "max_steps": 30}], out)
    assert main(["--config", str(recipe), "--training.learning_rate", "3e-4", "--training.logging_steps=10"]) == 0
    captured = capsys.readouterr()
    assert "loo importance" in captured.err and "mmr importance" in captured.err  # logged (h1rl.log)
    assert "2/2 stages done" in captured.out  # the command's closing summary

    resolved = load_config(DistillConfig, out / "resolved_config.yaml")
    assert resolved == load_config(DistillConfig, recipe, ["training.learning_rate=3e-4", "training.logging_steps=10"])
    run = json.loads((out / "manifest.json").read_text())
    assert run["complete"] and run["final_checkpoint"] == "stage_2/final"
    s1, s2 = run["stages"]
    loo = json.loads((out / "importance" / "stage_1_loo.json").read_text())
    mmr = json.loads((out / "importance" / "stage_2_mmr.json").read_text())

    # the layout changes as scheduled: the 2 lowest LOO scores, then the best MMR probe among the rest
    assert s1["layout_before"] == ["t"] * 4 and sorted(s1["swapped_layers"]) == sorted(
        r["layer"] for r in loo["ranking"][:2])
    assert [i for i, c in enumerate(s1["layout"]) if c == "m2"] == s1["swapped_layers"]
    assert mmr["layout"] == s2["layout_before"] == s1["layout"]
    assert {r["layer"] for r in mmr["ranking"]} == {i for i, c in enumerate(s1["layout"]) if c == "t"}
    assert s2["swapped_layers"] == [mmr["ranking"][0]["layer"]]
    assert s2["layout"].count("m2") == 3
    for stage in (s1, s2):
        m = stage["metrics"]
        assert m["kl_after_distill"] < m["kl_after_swap"], stage  # distillation recovers part of the swap's damage
        assert m["global_step"] == 30
        assert json.loads((out / f"stage_{stage['stage']}" / "manifest.json").read_text()) == stage
    assert s2["metrics"]["kl_before_swap"] == pytest.approx(s1["metrics"]["kl_after_distill"], rel=1e-4)
    for k, stage in ((1, s1), (2, s2)):
        model = AutoModelForCausalLM.from_pretrained(out / f"stage_{k}" / "final")
        assert model.config.hybrid_block_layout == stage["layout"]
    assert not list((out / "importance").glob("*probe*"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage_1", "stage_2"])
def test_resume_after_interruption_continues(make_config, tmp_path, stage):
    cfg = make_config([{"layers": [1], "max_steps": 8}, {"layers": [3], "max_steps": 12}])
    out = Path(cfg.output_dir)
    with pytest.raises(Interrupted):
        run_distillation(cfg, callbacks=[InterruptAt(stage, 6)])
    stage_dir = out / stage
    assert (stage_dir / "checkpoint-4").is_dir() and not (stage_dir / "manifest.json").exists()
    done_before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
                   if p.is_file() and (p.name in ("manifest.json", "swap.json", "model.safetensors"))
                   and "checkpoint" not in str(p) and p.parent != out}  # the run manifest is updated
    assert done_before and all(stage not in str(p) or p.name == "swap.json" for p in done_before)

    recorder = RecordStarts()
    run = run_distillation(cfg, callbacks=[recorder])
    # completed stages are not redone; the interrupted one restarts at its last checkpoint, not at step 0
    expected = [("stage_1", 4), ("stage_2", 0)] if stage == "stage_1" else [("stage_2", 4)]
    assert recorder.starts == expected
    for path, (content, mtime) in done_before.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, path  # swap.json reused too
    k = int(stage[-1])
    resumed = run["stages"][k - 1]
    assert resumed["resumed_from"] == f"{stage}/checkpoint-4"
    assert resumed["metrics"]["global_step"] == [8, 12][k - 1]
    assert run["complete"] and run["layout"] == ["t", "m2", "t", "m2"]
    assert [s["layout"] for s in run["stages"]] == [["t", "m2", "t", "t"], ["t", "m2", "t", "m2"]]

    # a third run finds everything done; a changed config is refused, naming the key
    assert run_distillation(cfg, callbacks=[recorder])["stages"] == run["stages"]
    assert len(recorder.starts) == len(expected)
    with pytest.raises(ConfigError, match=r"stages\.1\.max_steps changed"):
        run_distillation(load_config(DistillConfig, out / "resolved_config.yaml", ["stages.1.max_steps=13"]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stages.1.layers", "[7]"], "stage 2 (stages.1): layer 7 is out of range: the model has 4 layers (0..3)"),
        (["--stages.0.layers", "[0, 1, 2]", "--stages.1.layers", "[2, 3]"],
         "stage 2 (stages.1): layer 2 is not an attention layer any more (swapped by an earlier stage)"),
        (["--stages.1", "{scorer: loo, num_layers: 4, max_steps: 1}"],
         "stage 2 (stages.1): swaps 4 layers by loo but only 3 attention layers are left to choose from"),
        (["--stages.0={scorer: best, num_layers: 1, max_steps: 1}"], "stages.0: scorer: unknown scorer 'best'"),
        (["--training.learning_rat", "1"], "unknown key 'training.learning_rat' (did you mean 'learning_rate'?)"),
        (["training.seed=1"], "unexpected argument 'training.seed=1': give keys as --key value"),
    ],
)
def test_cli_rejects_bad_schedules_before_training(write_recipe, tmp_path, capsys, flags, message):
    recipe = write_recipe([{"layers": [1], "max_steps": 1}, {"layers": [2], "max_steps": 1}])
    assert main(["--config", str(recipe), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("h1rl distill: error: ")
    assert not (tmp_path / "run").exists()  # nothing written: a corrected rerun in the same output_dir starts cleanly


def test_eval_fn_import():
    from h1rl.distill.trainer import evaluate_metric

    assert import_eval_fn("h1rl.distill.trainer:evaluate_metric") is evaluate_metric
    with pytest.raises(ConfigError, match="importance.eval_fn: cannot import 'h1rl.nope:f'"):
        import_eval_fn("h1rl.nope:f")
