"""Importance scorers: LOO measures the metric increase of skipping a layer; MMR probes swapped copies; tables."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from h1rl.data.tokenizer import load_tokenizer
from h1rl.distill.config import DataConfig, LossConfig
from h1rl.distill.data import build_dataset, calibration_batches, make_collator
from h1rl.distill.importance import choose, format_table, loo_table, mmr_table, write_table
from h1rl.distill.swap import skip_layer
from h1rl.distill.trainer import batch_loss, evaluate_metric
from h1rl.models.convert import convert_teacher


@pytest.fixture
def world(toy_world):
    tok = load_tokenizer(toy_world["teacher"], padding_side="right")
    teacher = AutoModelForCausalLM.from_pretrained(toy_world["teacher"]).eval()
    student = convert_teacher(teacher, ["t", "t", "m2", "t"], ssm_cfg={"d_state": 16}, seed=0).eval()
    data = DataConfig(dataset_name=toy_world["calib"], max_length=64)
    batches = calibration_batches(build_dataset(toy_world["calib"], tok, data), make_collator(tok), 8, 8)
    return teacher, student, batches


def test_loo_ranks_by_metric_increase(world, tmp_path, capsys):
    teacher, student, batches = world
    cfg = LossConfig(chunk_size=8)
    measure = lambda m: evaluate_metric(m, teacher, batches, cfg)  # noqa: E731
    table = loo_table(student, [0, 1, 3], measure, "kl")
    assert table["scorer"] == "loo" and table["layout"] == ["t", "t", "m2", "t"]
    assert [row["layer"] for row in table["ranking"]] != [] and {r["layer"] for r in table["ranking"]} == {0, 1, 3}
    scores = [row["score"] for row in table["ranking"]]
    assert scores == sorted(scores) and all(s > 0 for s in scores)
    baseline = measure(student)
    with skip_layer(student, 3):
        direct = measure(student) - baseline
    row3 = next(r for r in table["ranking"] if r["layer"] == 3)
    assert row3["score"] == pytest.approx(direct, rel=1e-6)
    assert choose(table, 2) == sorted(r["layer"] for r in table["ranking"][:2])
    path = write_table(table, tmp_path / "imp" / "loo.json")
    assert json.loads(path.read_text())["ranking"] == table["ranking"]
    print(format_table(table))
    out = capsys.readouterr().out
    assert "loo importance" in out and "metric_without_layer" in out


def test_eval_callback_replaces_metric(world):
    teacher, student, batches = world
    calls = []

    def eval_fn(model, teacher_, batches_):  # e.g. a benchmark error; here: prefers skipping layer 1 least
        calls.append(1)
        skipped = [i for i, layer in enumerate(model.model.layers) if type(layer).__name__ == "IdentityLayer"]
        return {0: 5.0, 1: 9.0, 3: 1.0}.get(skipped[0], 0.0) if skipped else 0.0

    table = loo_table(student, [0, 1, 3], lambda m: eval_fn(m, teacher, batches), "eval_fn")
    assert [r["layer"] for r in table["ranking"]] == [3, 0, 1]
    assert len(calls) == 4  # baseline + one per candidate


def test_mmr_probes_each_candidate_on_a_copy(world):
    teacher, student, batches = world
    cfg = LossConfig(chunk_size=8)
    measure = lambda m: evaluate_metric(m, teacher, batches, cfg)  # noqa: E731
    probed = []

    def probe(model):  # a few plain Adam steps on the KL, standing in for the Trainer probe of a run
        probed.append(model.config.hybrid_block_layout)
        opt = torch.optim.Adam(model.parameters(), lr=5e-4)
        model.train()
        for step in range(6):
            loss = batch_loss(model, teacher, batches[step % len(batches)], cfg)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    before = {k: v.clone() for k, v in student.state_dict().items()}
    table = mmr_table(student, [0, 3], measure, probe, "kl", seed=0)
    assert probed == [["m2", "t", "m2", "t"], ["t", "t", "m2", "m2"]]
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # the student is untouched
    for row in table["ranking"]:
        assert row["score"] < row["metric_after_swap"]  # the probe trained the swapped copy
        assert set(row) >= {"probe_train_loss", "probe_seconds"}
