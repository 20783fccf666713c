"""DistillTrainer: trains the student toward the teacher, leaves the teacher alone, freezes non-Mamba on request."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from h1rl.distill.config import DataConfig, LossConfig, TrainingConfig
from h1rl.distill.data import build_dataset, calibration_batches, make_collator
from h1rl.distill.run import load_tokenizer
from h1rl.distill.trainer import DistillTrainer, evaluate_metric, set_trainable, training_arguments
from h1rl.models.convert import convert_teacher


def setup(toy_world, tmp_path, loss: LossConfig, steps: int, freeze: bool = False, batch: int = 8, **training):
    tok = load_tokenizer(toy_world["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(toy_world["teacher"]).eval()
    student = convert_teacher(teacher, ["t", "m2", "t", "m2"], ssm_cfg={"d_state": 16}, seed=0)
    data = DataConfig(path=toy_world["train"], max_length=48)
    ds = build_dataset(toy_world["train"], tok, data)
    calib = calibration_batches(build_dataset(toy_world["calib"], tok, data), make_collator(tok), 16, 16)
    set_trainable(student, mamba_only=freeze)
    args = training_arguments(TrainingConfig(per_device_train_batch_size=batch, logging_steps=5,
                                             lr_scheduler_type="constant", **training), str(tmp_path / "out"), steps,
                              5e-4, save=False, disable_tqdm=True)
    trainer = DistillTrainer(model=student, args=args, train_dataset=ds, data_collator=make_collator(tok),
                             processing_class=tok, teacher=teacher, loss_config=loss, pad_length=48)
    return trainer, student, teacher, calib


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_distillation_lowers_kl_and_keeps_teacher_frozen(toy_world, tmp_path):
    loss = LossConfig(kind="reverse_kl", ce_weight=0.1, hidden_weight=0.1, chunk_size=8)
    trainer, student, teacher, calib = setup(toy_world, tmp_path, loss, steps=20)
    kl_before = evaluate_metric(student, teacher, calib, loss)
    s0, t0 = snapshot(student), snapshot(teacher)
    trainer.train()
    kl_after = evaluate_metric(student, teacher, calib, loss)
    assert kl_after < 0.85 * kl_before, (kl_before, kl_after)
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(student.state_dict()[q0], s0[q0])  # attention layers train too
    logged = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert logged and all({"ce", "hidden"} <= set(entry) for entry in logged)
    losses = [entry["loss"] for entry in logged]
    assert losses[-1] < losses[0]


def test_gradient_accumulation_equals_one_big_batch(toy_world, tmp_path):
    """The loss is a mean over the step's target tokens, not a mean of per-micro-batch means: 2 x 4 rows == 8 rows
    (the same normalisation makes N processes train like one, see tests/distributed)."""
    loss = LossConfig(kind="reverse_kl", ce_weight=0.5, chunk_size=8)
    big, big_student, _, _ = setup(toy_world, tmp_path / "big", loss, steps=2, batch=8)
    small, small_student, _, _ = setup(toy_world, tmp_path / "small", loss, steps=2, batch=4,
                                       gradient_accumulation_steps=2)
    start = snapshot(big_student)
    assert all(torch.equal(v, small_student.state_dict()[k]) for k, v in start.items())
    big.train()
    small.train()
    moved = max((v - start[k]).abs().max().item() for k, v in big_student.state_dict().items())
    gap = max((v - small_student.state_dict()[k]).abs().max().item() for k, v in big_student.state_dict().items())
    assert moved > 1e-4 and gap < 1e-3 * moved, (moved, gap)


def test_freeze_non_mamba_trains_only_mixers(toy_world, tmp_path):
    trainer, student, teacher, _ = setup(toy_world, tmp_path, LossConfig(chunk_size=16), steps=3, freeze=True)
    s0 = snapshot(student)
    trainer.train()
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, s0[k])}
    assert changed and all(".mixer." in k for k in changed)
    assert any("layers.1.mixer.in_proj" in k for k in changed) and any("layers.3.mixer.A_log" in k for k in changed)


def test_peft_student_trains_only_adapters(toy_world, tmp_path):
    from peft import LoraConfig, get_peft_model

    trainer, student, teacher, _ = setup(toy_world, tmp_path, LossConfig(chunk_size=16), steps=4)
    peft_student = get_peft_model(student, LoraConfig(r=4, target_modules=["in_proj", "out_proj", "q_proj"]))
    trainer = DistillTrainer(model=peft_student, args=trainer.args, train_dataset=trainer.train_dataset,
                             data_collator=trainer.data_collator, teacher=teacher, loss_config=trainer.loss_config)
    s0 = snapshot(peft_student)
    trainer.train()
    changed = {k for k, v in peft_student.state_dict().items() if not torch.equal(v, s0[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any(".mixer.in_proj.lora_" in k for k in changed)  # the Mamba projections are adapted too
