"""On-policy distillation: prompts split off at the first target, completions sampled by the student with the
engine, step choice and sampling reproducible, and the DistillTrainer training on the sampled batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from h1rl.data.tokenizer import load_tokenizer
from h1rl.distill.config import DataConfig, LossConfig, OnPolicyConfig, TrainingConfig
from h1rl.distill.data import build_dataset, make_collator
from h1rl.distill.on_policy import is_on_policy_step, sampling_seed, split_prompts, student_batch
from h1rl.distill.trainer import DistillTrainer, training_arguments
from h1rl.eval import stop_token_ids
from h1rl.models.convert import convert_teacher
from h1rl.rollout import RolloutEngine, SamplingParams


@pytest.fixture
def world(toy_world):
    tok = load_tokenizer(toy_world["teacher"], padding_side="right")
    teacher = AutoModelForCausalLM.from_pretrained(toy_world["teacher"]).eval()
    student = convert_teacher(teacher, ["t", "m2", "t", "m2"], ssm_cfg={"d_state": 16}, seed=0)
    data = DataConfig(dataset_name=toy_world["train"], max_length=64, assistant_only_loss=True)
    ds = build_dataset(toy_world["train"], tok, data)
    return tok, teacher, student, ds, data


def test_split_prompts_at_the_first_target():
    pad = -100
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[pad, pad, 7, 8, pad, pad], [pad, pad, pad, pad, pad, pad], [pad, 2, 3, 4, 5, pad]]),
    }
    assert split_prompts(batch) == [[5, 6], None, [1]]
    batch["labels"][0] = torch.tensor([pad, 6, pad, 8, pad, pad])  # two assistant spans
    with pytest.raises(ValueError, match="row 0 of the batch has targets in more than one span"):
        split_prompts(batch)
    batch["labels"][0] = torch.tensor([5, 6, 7, pad, pad, pad])  # nothing before the first target
    with pytest.raises(ValueError, match="row 0 of the batch has no prompt"):
        split_prompts(batch)


def test_step_choice_is_a_reproducible_fraction():
    steps = range(2000)
    half = [is_on_policy_step(OnPolicyConfig(fraction=0.5), 0, s) for s in steps]
    assert half == [is_on_policy_step(OnPolicyConfig(fraction=0.5), 0, s) for s in steps]
    assert 0.45 < sum(half) / len(half) < 0.55
    assert half != [is_on_policy_step(OnPolicyConfig(fraction=0.5), 1, s) for s in steps]  # the seed matters
    assert not any(is_on_policy_step(OnPolicyConfig(fraction=0.0), 0, s) for s in steps)
    assert all(is_on_policy_step(OnPolicyConfig(fraction=1.0), 0, s) for s in steps)
    # the same in another process with another hash salt (a resumed run is a new process)
    code = ("from h1rl.distill.on_policy import is_on_policy_step, sampling_seed; from h1rl.distill.config import "
            "OnPolicyConfig; print([is_on_policy_step(OnPolicyConfig(fraction=0.5), 0, s) for s in range(50)], "
            "sampling_seed(0, 7, 1))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": salt}).stdout for salt in ("1", "2")}
    assert outputs == {f"{half[:50]} {sampling_seed(0, 7, 1)}\n"}


def test_student_batch_holds_the_students_own_completions(world):
    tok, _, student, ds, _ = world
    batch = make_collator(tok)([ds[i] for i in range(6)])
    batch["labels"][2] = -100  # a row without targets is kept as it is
    prompts = split_prompts(batch)
    stops = stop_token_ids(student, tok)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=stops)
    new, stats = student_batch(student, batch, params, tok, max_length=64)

    sampled = [i for i in range(6) if i != 2]
    expected = RolloutEngine(student, tok.pad_token_id).generate([prompts[i] for i in sampled], 1, params)
    for i, completion in zip(sampled, expected.completions()):
        n = len(prompts[i]) + len(completion)
        assert new["input_ids"][i, :n].tolist() == prompts[i] + completion
        assert new["attention_mask"][i].tolist() == [1] * n + [0] * (new["input_ids"].shape[1] - n)
        assert new["labels"][i, :n].tolist() == [-100] * len(prompts[i]) + completion
        assert (new["labels"][i, n:] == -100).all() and (new["input_ids"][i, n:] == tok.pad_token_id).all()
    real = batch["attention_mask"][2].bool()
    n = int(real.sum())
    assert new["input_ids"][2, :n].tolist() == batch["input_ids"][2][real].tolist()
    assert (new["labels"][2] == -100).all()
    assert stats["completion_length"] == pytest.approx(float(expected.lengths.float().mean()))

    # sampled (T = 1) rows: reproducible under the seed, different under another, cut at max_length
    sampling = SamplingParams(max_new_tokens=40, temperature=1.0, stop_token_ids=stops, seed=3)
    a, _ = student_batch(student, batch, sampling, tok, max_length=40)
    b, _ = student_batch(student, batch, sampling, tok, max_length=40)
    sampling.seed = 4
    c, _ = student_batch(student, batch, sampling, tok, max_length=40)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape[1] <= 40


def test_trainer_trains_on_student_samples(world, tmp_path, monkeypatch):
    tok, teacher, student, ds, data = world
    seen = []
    original = DistillTrainer.compute_loss

    def record(self, model, inputs, *args, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "compute_loss", record)
    args = training_arguments(TrainingConfig(per_device_train_batch_size=4, logging_steps=2,
                                             lr_scheduler_type="constant"), str(tmp_path / "out"), 6, 5e-4,
                              save=False, disable_tqdm=True)
    on_policy = OnPolicyConfig(fraction=0.5, max_completion_length=16)
    trainer = DistillTrainer(model=student, args=args, train_dataset=ds, data_collator=make_collator(tok),
                             processing_class=tok, teacher=teacher, loss_config=LossConfig(chunk_size=8),
                             pad_length=64, on_policy=on_policy)
    data_rows = {tuple(ds[i]["input_ids"]) for i in range(len(ds))}
    trainer.train()
    chosen = [is_on_policy_step(on_policy, args.seed, s) for s in range(6)]
    assert 0 < sum(chosen) < 6  # both kinds of step ran
    for step, inputs in enumerate(seen):
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(inputs["input_ids"], inputs["attention_mask"])]
        if chosen[step]:  # the student's completions: rows of the data only by chance, completions capped
            assert sum(r in data_rows for r in rows) < len(rows)
            completion = (inputs["labels"] != -100).sum(1)
            assert int(completion.max()) <= 16
        else:
            assert all(r in data_rows for r in rows)
    logged = [e for e in trainer.state.log_history if "on_policy" in e]
    assert logged and all("on_policy/completion_length" in e or e["on_policy"] == 0 for e in logged)


def test_config_needs_assistant_only_loss(make_config):
    stages = [{"layers": [1], "max_steps": 2}]
    with pytest.raises(ValueError, match="on_policy.fraction > 0 needs data.assistant_only_loss"):
        make_config(stages, ["on_policy.fraction=0.5"])
    with pytest.raises(ValueError, match="fraction: must be in"):
        make_config(stages, ["on_policy.fraction=2", "data.assistant_only_loss=true"])
    assert make_config(stages, ["on_policy.fraction=1", "data.assistant_only_loss=true"]).on_policy.fraction == 1.0


class StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resumed_run_samples_and_trains_as_an_uninterrupted_one(world, tmp_path):
    """Step choice and sampling seeds come from (seed, step): resuming from a checkpoint reproduces the weights."""
    tok, teacher, _, ds, _ = world

    def trainer(out, steps):
        student = convert_teacher(teacher, ["t", "m2", "t", "m2"], ssm_cfg={"d_state": 16}, seed=0)
        args = training_arguments(TrainingConfig(per_device_train_batch_size=4, save_steps=3, logging_steps=3),
                                  str(out), steps, 5e-4, disable_tqdm=True)
        return DistillTrainer(model=student, args=args, train_dataset=ds, data_collator=make_collator(tok),
                              processing_class=tok, teacher=teacher, loss_config=LossConfig(chunk_size=8),
                              pad_length=64, on_policy=OnPolicyConfig(fraction=0.5, max_completion_length=16)), student

    whole, whole_student = trainer(tmp_path / "whole", 6)
    whole.train()
    first, _ = trainer(tmp_path / "split", 6)
    first.add_callback(StopAfter(3))  # stops after the checkpoint at step 3, as a killed run would have left it
    first.train()
    resumed, resumed_student = trainer(tmp_path / "split", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))
    assert [is_on_policy_step(OnPolicyConfig(fraction=0.5), 0, s) for s in range(6)].count(True) in range(1, 6)
    for name, value in whole_student.state_dict().items():
        assert torch.equal(value, resumed_student.state_dict()[name]), name
