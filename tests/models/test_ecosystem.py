"""The hybrid passes through the ecosystem unmodified: transformers.Trainer, PEFT LoRA, stock trl.GRPOTrainer."""

from __future__ import annotations

import torch
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset

MAMBA_AND_ATTENTION = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


def test_lora_on_mamba_and_attention_projections_trains():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(["t", "m2", "m2"]).train(), LoraConfig(r=4, target_modules=MAMBA_AND_ATTENTION))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrapped = {n.split(".lora_")[0] for n in trainable}
    for layer, kinds in ((0, ["q_proj", "k_proj", "v_proj", "o_proj"]), (1, ["in_proj", "out_proj"]),
                         (2, ["in_proj", "out_proj"])):
        for kind in kinds:
            assert any(f"layers.{layer}." in w and w.endswith(kind) for w in wrapped), (layer, kind)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(1, 97, (2, 12))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        no_grad = [n for n, p in trainable.items() if p.grad is None]
        assert not no_grad, no_grad
        opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_transformers_trainer_trains_the_hybrid(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model(["t", "m2"]).train()
    ids = torch.randint(1, 97, (16, 10))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert result.global_step == 6


def test_stock_trl_grpo_trainer_runs_the_hybrid(tmp_path):
    """TRL's own GRPOTrainer (generation through model.generate, fused LM head) works on the hybrid unmodified."""
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2"], vocab_size=len(tokenizer)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=6, max_steps=1, learning_rate=1e-2, report_to=[],
                      save_strategy="no", seed=0)
    data = Dataset.from_dict({"prompt": [f"what is {i}" for i in range(8)]})

    def distinct_words(completions, **kwargs):
        return [float(len(set(c.split()))) for c in completions]

    GRPOTrainer(model=model, reward_funcs=distinct_words, args=args, train_dataset=data,
                processing_class=tokenizer).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
