"""HybridGRPOTrainer: GRPO steps on a tiny hybrid train it, with rollouts from the engine, plain and with LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset

from h1rl.rl.trainer import HybridGRPOTrainer, group_consecutive


def distinct_words(completions, **kwargs):
    """A toy verifiable reward that varies within a group: the number of distinct words of the completion."""
    return [float(len(set(c.split()))) for c in completions]


def grpo_args(tmp_path, **overrides):
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
        seed=0, temperature=1.0, beta=0.0,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def prompts_dataset(n=8):
    return Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(n)]})


def test_group_consecutive():
    assert group_consecutive([[1], [1], [2], [2], [2], [1]]) == ([[1], [2], [1]], [2, 3, 1])


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_grpo_steps_change_parameters_and_log_rollouts(tmp_path, steps_per_generation):
    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HybridGRPOTrainer(
        model=model, reward_funcs=distinct_words, args=grpo_args(tmp_path, steps_per_generation=steps_per_generation),
        train_dataset=prompts_dataset(), processing_class=tokenizer,
    )
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} tensors changed"
    logs = trainer.state.log_history
    assert any("rollout/tokens_per_s" in entry for entry in logs), logs
    assert any("reward" in entry for entry in logs)
    if steps_per_generation > 1:  # TRL would recompute old log-probs; the engine's are served instead
        assert any(entry.get("rollout/old_logps_served") for entry in logs), logs


def test_grpo_with_lora_trains_adapters_only(tmp_path):
    from peft import LoraConfig

    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2"], vocab_size=len(tokenizer)).train()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = HybridGRPOTrainer(
        model=model, reward_funcs=distinct_words, args=grpo_args(tmp_path), train_dataset=prompts_dataset(),
        processing_class=tokenizer, peft_config=lora,
    )
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert any(".mixer.in_proj.lora_A" in n for n in adapters) and any(".self_attn.q_proj.lora_A" in n for n in adapters)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert len(changed) == len(adapters), sorted(set(adapters) - set(changed))
