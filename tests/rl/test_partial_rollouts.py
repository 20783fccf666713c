"""Partial rollouts (h1rl.rl.partial_rollouts): rows set aside by a decode budget and continued in later steps are
the rows one uninterrupted rollout would give under a frozen policy; tokens of older policies get capped
importance-sampling ratios, the current policy's ratio 1; the pool survives a SIGKILL and a resume."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset
from safetensors.torch import load_file

from h1rl.rl.config import HybridGRPOConfig
from h1rl.rl.trainer import HybridGRPOTrainer
from h1rl.rollout import ResumedRow, RolloutEngine


def distinct_words(completions, **kwargs):
    return [float(len(set(c.split()))) for c in completions]


def trainer(tmp_path, lr: float, **overrides) -> HybridGRPOTrainer:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer)).train()
    # the digits stop a completion too: lengths spread, so a small budget sets rows aside
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *digits]
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                  max_steps=4, learning_rate=lr, logging_steps=1, report_to=[], save_strategy="no", seed=0, beta=0.0,
                  partial_rollout_budget=3, optim="sgd")
    kwargs.update(overrides)
    args = HybridGRPOConfig(**kwargs)
    dataset = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    return HybridGRPOTrainer(model=model, reward_funcs=distinct_words, args=args, train_dataset=dataset,
                             processing_class=tokenizer)


def test_rows_continued_across_steps_equal_one_go_under_a_frozen_policy(tmp_path, monkeypatch):
    """Learning rate 0: every row of every batch, carried over steps or not, equals the row one engine call with
    the same uniform stream generates in one go."""
    run = trainer(tmp_path, lr=0.0)
    batches = []
    step = type(run.partial_rollouts).step

    def spy(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        batches.append(list(self.last_batch))
        return out

    monkeypatch.setattr(type(run.partial_rollouts), "step", spy)
    run.train()
    carried = [g for batch in batches for g in batch if any(g.older_tokens)]
    assert carried, "no group was carried over a step: the test would not test continuation"
    params = run._sampling_params(1)
    engine = RolloutEngine(run.model, pad_token_id=run.processing_class.pad_token_id)
    groups = [g for batch in batches for g in batch]
    again = engine.generate([], params=params, resumed=[ResumedRow(g.prompt_ids, [], [], origin)
                                                        for g in groups for origin in g.origins])
    rows = [c for g in groups for c in g.completions]
    logprobs = [lp for g in groups for lp in g.logprobs]
    assert again.completions() == rows
    for r, lp in enumerate(logprobs):
        assert (again.logprobs[r, : len(lp)] - torch.tensor(lp)).abs().max() <= 1e-5, f"row {r}"


def test_older_policy_tokens_get_capped_ratios_and_current_ones_ratio_one(tmp_path, monkeypatch):
    cap = 1.05
    run = trainer(tmp_path, lr=0.5, vllm_importance_sampling_mode="token_truncate",
                  vllm_importance_sampling_clip_max=cap)
    assert run.importance_sampling_correction  # forced on: float32 would leave it off
    seen, filled = [], []
    correct, fill = HybridGRPOTrainer._correct_sampling_mismatch, HybridGRPOTrainer._fill_deferred_ratio

    def spy(self, output):  # each row's count of older-policy tokens, as the batch is made
        output = correct(self, output)
        older = [n for g in self.partial_rollouts.last_batch for n in g.older_tokens]
        seen.extend(zip(output["completion_ids"].tolist(), older, strict=True))
        return output

    def spy_fill(self, inputs, logps):  # the ratio each (shuffled) row is trained with, from its training forward
        fill(self, inputs, logps)
        filled.extend(zip(inputs["completion_ids"].tolist(), inputs["importance_sampling_ratio"].clone(),
                          inputs["completion_mask"].clone(), strict=True))

    monkeypatch.setattr(HybridGRPOTrainer, "_correct_sampling_mismatch", spy)
    monkeypatch.setattr(HybridGRPOTrainer, "_fill_deferred_ratio", spy_fill)
    run.train()
    older_of = {}
    for ids, n in seen:  # rows matched by their tokens; a completion seen twice with other counts is left out
        older_of[tuple(ids)] = n if older_of.get(tuple(ids), n) == n else None
    old_ratios, new_ratios = [], []
    for ids, ratio, mask in filled:
        n = older_of.get(tuple(ids))
        if n is None:
            continue
        real = mask.bool()
        old_ratios.append(ratio[:n][real[:n]])
        new_ratios.append(ratio[n:][real[n:]])
    old, new = torch.cat(old_ratios), torch.cat(new_ratios)
    assert old.numel() > 0 and new.numel() > 0
    assert (new - 1).abs().max() <= 1e-4  # the current policy's own tokens (float32)
    assert old.max() <= cap + 1e-6 and (old - 1).abs().max() > 1e-3  # older policies' tokens: moved, and capped
    assert any(e.get("partial_rollouts/carried_groups", 0) > 0 for e in run.state.log_history)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="partial_rollout_budget and dynamic_sampling_rounds do not combine"):
        HybridGRPOConfig(output_dir="/tmp/x", partial_rollout_budget=4, dynamic_sampling_rounds=1)
    with pytest.raises(ValueError, match="needs importance_sampling_correction"):
        HybridGRPOConfig(output_dir="/tmp/x", partial_rollout_budget=4, importance_sampling_correction=False)
    with pytest.raises(ValueError, match="partial_rollout_budget must be >= 1"):
        HybridGRPOConfig(output_dir="/tmp/x", partial_rollout_budget=0)


@pytest.mark.slow
def test_resume_after_sigkill_keeps_the_set_aside_rows(tmp_path):
    """`h1rl grpo` killed mid-run and started again: the set-aside groups come back from the checkpoint, and the run
    ends with the weights of an uninterrupted one."""
    from test_run import make_assets, recipe, run_cli

    model, data = make_assets(tmp_path)
    keys = dict(max_steps=5, partial_rollout_budget=2, max_completion_length=12, per_device_train_batch_size=8)
    straight = recipe(tmp_path, model, data, tmp_path / "straight", **keys)
    killed = recipe(tmp_path, model, data, tmp_path / "killed", **keys)
    run_cli(straight)
    assert run_cli(killed, kill_when=tmp_path / "killed" / "checkpoint-2") == -signal.SIGKILL
    pools = [torch.load(p, weights_only=False) for p in sorted((tmp_path / "killed").glob("checkpoint-*/partial_*"))]
    assert pools and any(pools), "no checkpoint held set-aside groups"
    run_cli(killed)
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state = json.loads((tmp_path / "killed" / "checkpoint-5" / "trainer_state.json").read_text())
    assert any(e.get("partial_rollouts/carried_groups", 0) > 0 for e in state["log_history"])
