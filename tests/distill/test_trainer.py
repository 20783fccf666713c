"""DistillTrainer: trains the student toward the teacher, leaves the teacher alone, freezes non-Mamba on request;
its forward keeps only the hidden states a loss uses (peak memory measured), and its loss chunks are as many on
every process."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from h1rl.data.tokenizer import load_tokenizer
from h1rl.distill.config import DataConfig, LossConfig, TrainingConfig
from h1rl.distill.data import build_dataset, calibration_batches, make_collator
from h1rl.distill.losses import FLOAT32_BYTES, chunk_temporaries, distill_loss
from h1rl.distill.trainer import (
    DistillTrainer,
    batch_loss,
    evaluate_metric,
    hidden_states,
    set_trainable,
    training_arguments,
)
from h1rl.models.convert import convert_teacher


def setup(toy_world, tmp_path, loss: LossConfig, steps: int, freeze: bool = False, batch: int = 8, lr: float = 5e-4,
          **training):
    tok = load_tokenizer(toy_world["teacher"], padding_side="right")
    teacher = AutoModelForCausalLM.from_pretrained(toy_world["teacher"]).eval()
    student = convert_teacher(teacher, ["t", "m2", "t", "m2"], ssm_cfg={"d_state": 16}, seed=0)
    data = DataConfig(dataset_name=toy_world["train"], max_length=64)
    ds = build_dataset(toy_world["train"], tok, data)
    calib = calibration_batches(build_dataset(toy_world["calib"], tok, data), make_collator(tok), 16, 16)
    set_trainable(student, mamba_only=freeze)
    args = training_arguments(TrainingConfig(per_device_train_batch_size=batch, logging_steps=5,
                                             lr_scheduler_type="constant", **training), str(tmp_path / "out"), steps,
                              lr, save=False, disable_tqdm=True)
    trainer = DistillTrainer(model=student, args=args, train_dataset=ds, data_collator=make_collator(tok),
                             processing_class=tok, teacher=teacher, loss_config=loss, pad_length=64)
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
    (the same normalisation makes N processes train like one, see tests/distributed). SGD: Adam's normalised step
    turns last-bit differences of near-zero gradients into full-size ones."""
    loss = LossConfig(kind="reverse_kl", ce_weight=0.5, chunk_size=8)
    sgd = {"lr": 0.05, "trainer_args": {"optim": "sgd"}}
    big, big_student, _, _ = setup(toy_world, tmp_path / "big", loss, steps=2, batch=8, **sgd)
    small, small_student, _, _ = setup(toy_world, tmp_path / "small", loss, steps=2, batch=4,
                                       gradient_accumulation_steps=2, **sgd)
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


# ------------------------------------------------------------------------------------- what the forward keeps

L, D, B, T = 24, 64, 8, 64  # deep: every layer's states (L + 1) outweigh a layer's own temporaries (~10 states)
STATE = B * T * D * FLOAT32_BYTES


def deep_pair(m2_layers=(3, 7)) -> tuple[MistralForCausalLM, torch.nn.Module]:
    """A 24-layer Mistral teacher (random weights) and its hybrid with `m2_layers` swapped to Mamba."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=56, hidden_size=D, intermediate_size=D, num_hidden_layers=L,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    teacher = MistralForCausalLM(config).eval()
    layout = ["m2" if i in m2_layers else "t" for i in range(L)]
    return teacher, convert_teacher(teacher, layout, ssm_cfg={"d_state": 16}, seed=0).eval()


def toy_batch(rows: int = B) -> dict[str, torch.Tensor]:
    """Right-padded rows (the collator's layout) with a prompt without loss."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 56, (rows, T), generator=g)
    mask = torch.ones(rows, T, dtype=torch.long)
    mask[0, T - 20:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Root(torch.nn.Module):
    """One root module over the models, whose forward runs `fn`: MemTracker wants a module called more than once
    (the LM head: the forward's last position, then each loss chunk) to be under one root."""

    def __init__(self, *models: torch.nn.Module):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, fn):
        return fn()


def peak_bytes(fn, *models) -> int:
    """Peak bytes beyond the models' parameters while `fn()` runs without gradients (MemTracker, CPU)."""
    root = Root(*models)
    tracker = MemTracker()
    tracker.track_external(root)
    with tracker, torch.no_grad():
        root(fn)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak["Total"] - peak[next(k for k in peak if str(k).endswith("PARAM"))]


def plain_forward(model, batch, **kwargs):
    return lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                         use_cache=False, **kwargs)


def test_without_hidden_loss_no_layer_states_are_kept():
    """hidden_weight 0: each model's forward peaks as a plain forward does (the final state is kept, one (B, T, D)
    tensor), where asking for every layer's states, as before, costs one more per layer. Without gradients: in
    training, autograd keeps the student's layer inputs anyway; the teacher always runs without."""
    teacher, student = deep_pair()
    batch = toy_batch()
    for model in (teacher, student):
        plain = peak_bytes(plain_forward(model, batch), model)
        every = peak_bytes(plain_forward(model, batch, output_hidden_states=True), model)
        assert every >= plain + L // 2 * STATE  # the measure sees per-layer states
        assert peak_bytes(lambda model=model: hidden_states(model, batch), model) <= plain + STATE, type(model)
        final, kept = hidden_states(model, batch)
        assert final.shape == (B, T, D) and kept == {}
    plain = max(peak_bytes(plain_forward(m, batch), m) for m in (teacher, student))
    whole = peak_bytes(lambda: batch_loss(student, teacher, batch, LossConfig()), student, teacher)
    assert whole <= plain + 3 * STATE  # both final states, the loss's chunk: far from L more states


@pytest.mark.slow
def test_teacher_at_the_15b_shape_keeps_no_layer_states():
    """Apriel-H1-15B's shape as a Mistral teacher (50 layers, hidden 5120, vocabulary 131072, bf16) on 8 x 8k tokens,
    on fake tensors (nothing is allocated; ~20 s): every layer's states would add 51 x 640 MiB, about 30 GiB, to the
    forward's peak; `hidden_states` adds nothing to a plain forward's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = MistralConfig(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=50,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)
    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            teacher = MistralForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default)
        batch = {"input_ids": torch.zeros(8, 8192, dtype=torch.long),
                 "attention_mask": torch.ones(8, 8192, dtype=torch.long)}
        state = 8 * 8192 * 5120 * 2
        plain = peak_bytes(plain_forward(teacher, batch), teacher)
        # fake tensors cannot be read: the layout is given (the collator's, right-padded)
        assert peak_bytes(lambda: hidden_states(teacher, batch, is_right_padded=True), teacher) <= plain + state
        assert peak_bytes(plain_forward(teacher, batch, output_hidden_states=True), teacher) >= plain + 45 * state


def reference_loss(student, teacher, batch, config: LossConfig, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The former implementation: every layer's states from both models (`output_hidden_states=True`), then the KL
    on the last ones and the mean squared error of `layers` (state i + 1 is layer i's output)."""
    ids = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": 1,
           "use_cache": False, "output_hidden_states": True}
    s = student(**ids).hidden_states
    with torch.no_grad():
        t = teacher(**ids).hidden_states
    parts = distill_loss(s[-1], t[-1], student.lm_head, teacher.lm_head, batch["labels"], config)
    mask = batch["attention_mask"].float()
    hidden = sum(((s[i + 1] - t[i + 1]) ** 2).sum(-1).mul(mask).sum() / (mask.sum() * D) for i in layers) / len(layers)
    return parts["loss"] + config.hidden_weight * hidden, hidden


@pytest.mark.parametrize("which, checkpointing", [("mamba", False), ("mamba", True), ("all", False)])
def test_hidden_loss_keeps_the_aligned_layers_only_and_matches_every_layer_states(which, checkpointing):
    """hidden_weight > 0: only the selected layers' outputs are kept (m2 layers 3 and 7 of 24: at most two states
    more than a plain forward), and loss and gradients equal those computed from every layer's states, also under
    activation checkpointing (the kept states carry the gradient)."""
    teacher, student = deep_pair()
    batch = toy_batch()
    layers = [3, 7] if which == "mamba" else list(range(L))
    if which == "mamba":
        plain = peak_bytes(plain_forward(teacher, batch), teacher)
        assert peak_bytes(plain_forward(teacher, batch, output_hidden_states=True), teacher) >= plain + L // 2 * STATE
        assert peak_bytes(lambda: hidden_states(teacher, batch, layers), teacher) <= plain + 3 * STATE
        _, kept = hidden_states(teacher, batch, layers)
        every = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        real = batch["attention_mask"].bool()  # right-padded rows run without a mask: compare the real tokens
        assert sorted(kept) == layers
        for i in layers:
            torch.testing.assert_close(kept[i][real], every.hidden_states[i + 1][real], rtol=1e-5, atol=1e-5)
    _, kept = hidden_states(teacher, batch, [L - 1])
    final = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(kept[L - 1][real], final.hidden_states[-1][real], rtol=1e-5, atol=1e-5)  # normed

    config = LossConfig(ce_weight=0.5, hidden_weight=0.7, hidden_layers=which)
    student.train()
    if checkpointing:
        student.activation_checkpointing_enable()
    def new_loss():
        parts = batch_loss(student, teacher, batch, config)
        return parts["loss"], parts["hidden"]

    results = []
    for fn in (lambda: reference_loss(student, teacher, batch, config, layers), new_loss):
        student.zero_grad()
        loss, hidden = fn()
        loss.backward()
        results.append((loss.detach(), hidden.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (loss_ref, hidden_ref, grads_ref), (loss, hidden, grads) = results
    assert hidden > 0 and grads_ref["model.layers.3.mixer.in_proj.weight"].abs().max() > 0
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden, hidden_ref, rtol=1e-6, atol=0)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_hidden_loss_refuses_left_padded_rows():
    teacher, student = deep_pair()
    batch = toy_batch()
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="needs right-padded rows"):
        batch_loss(student, teacher, batch, LossConfig(hidden_weight=1.0))


# ---------------------------------------------------------------------------------------- ZeRO-3 chunk count


def test_chunk_count_follows_the_configured_batch_not_the_micro_batch(toy_world, tmp_path):
    """The Trainer sizes the loss chunks for training.per_device_train_batch_size (8) and pads them to pad_length
    (64): a last micro-batch of 3 shorter rows calls the LM heads as often as a full one (ZeRO-3 gathers them)."""
    vocab = AutoModelForCausalLM.from_pretrained(toy_world["teacher"]).config.vocab_size
    loss = LossConfig(chunk_bytes=chunk_temporaries(LossConfig()) * 8 * vocab * FLOAT32_BYTES * 5)  # 5 positions
    trainer, student, teacher, _ = setup(toy_world, tmp_path, loss, steps=1)
    full = next(iter(trainer.get_train_dataloader()))
    short = {k: v[:3, :20] for k, v in full.items()}
    student.train()
    calls = []
    teacher.lm_head.register_forward_hook(lambda *args: calls.append(1))
    counts = []
    for batch in (full, short):
        calls.clear()
        trainer.compute_loss(trainer.model, batch)
        counts.append(len(calls))
    assert full["input_ids"].shape[0] == 8 and counts == [1 + math.ceil(64 / 5)] * 2  # 1: the forward's last logits


def test_right_padded_batches_reach_the_models_without_a_mask():
    """The distillation collator right-pads: both models then run with no attention mask (a transformers teacher
    takes its flash kernel instead of building a (B, 1, T, T) mask), with the masked forward's real-token outputs;
    a left-padded batch keeps its mask."""
    teacher, student = deep_pair()
    batch = toy_batch()
    assert not bool(batch["attention_mask"].all())  # some rows are padded (on the right)
    seen = []
    hook = teacher.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                             with_kwargs=True)
    try:
        final, _ = hidden_states(teacher, batch)
        left = {"input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1)}
        hidden_states(teacher, left)
    finally:
        hook.remove()
    assert seen[0] is None and seen[1] is not None
    masked = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(final[real], masked.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
