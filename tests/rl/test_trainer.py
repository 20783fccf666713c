"""HybridGRPOTrainer: GRPO steps on a tiny hybrid train it, with rollouts from the engine, plain and with LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset

from h1rl.models import HybridForCausalLM
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
    torch.manual_seed(0)  # a random model whose groups all tie would give no gradient; keep it one that does not
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
    # float32: the sampler/trainer mismatch correction is off by default (tests/rl/test_importance.py)
    assert trainer.importance_sampling_correction is False
    assert not any(key.startswith("sampling/") for entry in logs for key in entry)


def test_grpo_with_lora_trains_adapters_only(tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2"], vocab_size=len(tokenizer)).train()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = HybridGRPOTrainer(
        model=model, reward_funcs=distinct_words, args=grpo_args(tmp_path, max_steps=4),
        train_dataset=prompts_dataset(), processing_class=tokenizer, peft_config=lora,
    )
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert any(".mixer.in_proj.lora_A" in n for n in adapters)
    assert any(".self_attn.q_proj.lora_A" in n for n in adapters)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert len(changed) == len(adapters), sorted(set(adapters) - set(changed))


@pytest.mark.parametrize("lora, steps_per_generation", [(False, 1), (True, 1), (True, 2)])
def test_kl_is_measured_against_the_reference_model(tmp_path, lora, steps_per_generation):
    """beta > 0: the reference is TRL's (a copy loaded from the checkpoint, or the base model with the LoRA adapter
    disabled), never the engine's log-probs of the current policy, which would make the KL exactly 0. With
    steps_per_generation 2, TRL asks for the old policy's log-probs too: those alone are served, once per batch."""
    from peft import LoraConfig

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tiny_model(["t", "m2"], vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    model = HybridForCausalLM.from_pretrained(tmp_path / "model").train()  # TRL loads its reference from this path
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "out_proj", "q_proj", "v_proj"]) if lora else None
    args = grpo_args(tmp_path / "run", beta=0.5, max_steps=4, learning_rate=5e-2,
                     steps_per_generation=steps_per_generation)
    trainer = HybridGRPOTrainer(model=model, reward_funcs=distinct_words, args=args, train_dataset=prompts_dataset(),
                                processing_class=tokenizer, peft_config=peft)
    assert (trainer.ref_model is None) == lora
    trainer.train()
    logs = [e for e in trainer.state.log_history if "kl" in e]
    assert len(logs) == 4 and logs[-1]["kl"] > 1e-4, logs  # the policy moved away from its reference
    served = [e.get("rollout/old_logps_served", 0.0) for e in logs]
    assert served == ([1.0, 0.0, 1.0, 0.0] if steps_per_generation == 2 else [0.0] * 4), served


def first_token_parity(completion_ids, **kwargs):
    """Ties often: 1 if the first completion token id is even, else 0 (a group of 4 ties with probability 1/8)."""
    return [float(ids[0] % 2 == 0) if ids else 0.0 for ids in completion_ids]


def test_dynamic_sampling_refills_tied_groups(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2"], vocab_size=len(tokenizer)).train()
    trainer = HybridGRPOTrainer(
        model=model, reward_funcs=first_token_parity, args=grpo_args(tmp_path, max_steps=3, num_generations=2),
        train_dataset=prompts_dataset(16), processing_class=tokenizer, dynamic_sampling_rounds=3,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "dynamic_sampling/tied_groups" in e]
    assert len(logs) == 3
    tied = sum(e["dynamic_sampling/tied_groups"] for e in logs)
    after = sum(e["dynamic_sampling/tied_after"] for e in logs)
    assert tied > 0 and after < tied, logs  # tied groups were seen, and (most) were replaced
    assert all(e["dynamic_sampling/extra_rounds"] <= 3 for e in logs)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_skipping_zero_advantage_rows_leaves_the_update_unchanged(tmp_path, loss_type):
    """first_token_parity ties whole groups often: with the skip, "dapo" trains on fewer rows to the same parameters
    as training on every row; "bnpo" (normalised by the micro-batch's own tokens) is not eligible and trains on all."""
    tokenizer = tiny_tokenizer()
    results = {}
    for skip in (False, True):
        torch.manual_seed(0)
        model = tiny_model(["t", "m2"], vocab_size=len(tokenizer)).train()
        trainer = HybridGRPOTrainer(
            model=model, reward_funcs=first_token_parity,
            args=grpo_args(tmp_path / str(skip), max_steps=3, num_generations=2, per_device_train_batch_size=8,
                           loss_type=loss_type),
            train_dataset=prompts_dataset(16), processing_class=tokenizer, skip_zero_advantage_rows=skip,
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        results[skip] = ({n: p.detach().clone() for n, p in model.named_parameters()}, trainer.state.log_history)
    (plain, plain_logs), (skipped, logs) = results[False], results[True]
    kept = [e["train/rows_trained"] for e in logs if "train/rows_trained" in e]
    if loss_type == "bnpo":
        assert not kept and not any("train/rows_trained" in e for e in plain_logs)
        assert all(torch.equal(plain[n], skipped[n]) for n in plain)
        return
    assert len(kept) == 3 and min(kept) < 1.0, kept  # some rows were left out of the training pass
    assert any(not torch.equal(plain[n], before[n]) for n in plain)  # the runs did learn
    for name in plain:  # the same update up to float summation order
        torch.testing.assert_close(skipped[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sharing_the_prompt_prefix_leaves_the_update_unchanged(tmp_path, monkeypatch):
    """The training forward over G rows per prompt, run with each prompt once (share_prompt_prefix), trains to the
    same parameters as TRL's forward over every row; the spy confirms the shared path was taken. SGD: Adam would
    amplify float rounding on near-zero gradient entries into visible differences."""
    import h1rl.models.modeling as modeling

    calls = []  # distinct prompts of each shared-prefix forward
    original = modeling.prefix_groups
    monkeypatch.setattr(modeling, "prefix_groups",
                        lambda ids, mask: (lambda out: calls.append(len(out[0])) or out)(original(ids, mask)))
    tokenizer = tiny_tokenizer()
    results = {}
    for share in (False, True):
        torch.manual_seed(0)
        model = tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer)).train()
        args = grpo_args(tmp_path / str(share), max_steps=3, gradient_checkpointing=False, optim="sgd",
                         learning_rate=0.5)
        trainer = HybridGRPOTrainer(
            model=model, reward_funcs=distinct_words, args=args, train_dataset=prompts_dataset(),
            processing_class=tokenizer, share_prompt_prefix=share,
        )
        trainer.train()
        assert bool(calls) == share
        results[share] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert set(calls) == {1}  # one distinct prompt (of 4 rows, shuffled by TRL) per training batch
    torch.manual_seed(0)
    start = dict(tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer)).named_parameters())
    for name, plain in results[False].items():
        moved = (plain - start[name]).abs().max()
        assert moved > 0, name
        assert (results[True][name] - plain).abs().max() <= 1e-4 * moved, name


def test_merge_rows_repads_prompts_left_and_completions_right():
    from h1rl.rl.dynamic_sampling import merge_rows

    target = {"prompt_ids": torch.tensor([[0, 5], [6, 7]]), "completion_ids": torch.tensor([[1], [2]]),
              "advantages": torch.tensor([0.0, 0.0]), "num_items_in_batch": torch.tensor(2)}
    source = {"prompt_ids": torch.tensor([[8, 9, 10]]), "completion_ids": torch.tensor([[3, 4, 5]]),
              "advantages": torch.tensor([1.5]), "num_items_in_batch": torch.tensor(3)}
    merged = merge_rows(target, source, range(0, 1), range(0, 1))
    assert merged["prompt_ids"].tolist() == [[8, 9, 10], [0, 6, 7]]
    assert merged["completion_ids"].tolist() == [[3, 4, 5], [2, 0, 0]]
    assert merged["advantages"].tolist() == [1.5, 0.0]


def test_a_broken_reward_is_named_with_its_sample(tmp_path):
    from h1rl.rewards import RewardError

    def sometimes_nan(completions, **kwargs):
        return [float("nan") if i == 2 else 1.0 for i, _ in enumerate(completions)]

    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2"], vocab_size=len(tokenizer)).train()
    trainer = HybridGRPOTrainer(model=model, reward_funcs=[distinct_words, sometimes_nan], args=grpo_args(tmp_path),
                                train_dataset=prompts_dataset(), processing_class=tokenizer)
    with pytest.raises(RewardError, match=r"sometimes_nan.*sample 2"):
        trainer.train()


def test_rollout_budget_reaches_the_engine_and_changes_nothing_but_memory(tmp_path):
    """A tight rollout budget (2 rows at once, 2-token prefill chunks) trains exactly like the unbounded default:
    the engine samples the same completions whatever its budget (fp32, seeded)."""
    from h1rl.rollout import RolloutBudget

    tokenizer = tiny_tokenizer()
    trained = []
    for budget in (None, RolloutBudget(max_rows=2, prefill_chunk=2)):
        torch.manual_seed(0)
        model = tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer)).train()
        trainer = HybridGRPOTrainer(model=model, reward_funcs=distinct_words, args=grpo_args(tmp_path),
                                    train_dataset=prompts_dataset(), processing_class=tokenizer, rollout_budget=budget)
        trainer.train()
        rows = [e["rollout/rows_at_once"] for e in trainer.state.log_history if "rollout/rows_at_once" in e]
        assert rows and set(rows) == ({4.0} if budget is None else {2.0})
        trained.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=0, atol=1e-6, msg=name)


def test_overlapped_scoring_changes_nothing_but_when_checks_run(tmp_path, monkeypatch):
    """overlap_scoring hands rows to the accuracy reward's prefetch as they finish; the run trains to the same
    parameters with the same rewards as scoring after the rollout (overlap_scoring off)."""
    from h1rl.rewards import accuracy_reward
    from h1rl.rewards.accuracy import AccuracyReward

    calls = []
    prefetch = AccuracyReward.prefetch
    monkeypatch.setattr(AccuracyReward, "prefetch", lambda self, **kw: calls.append(len(kw["completions"])) or
                        prefetch(self, **kw))
    tokenizer = tiny_tokenizer()
    dataset = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(8)],
                                 "answer": [str(2 * i) for i in range(8)]})
    results = {}
    for overlap in (False, True):
        calls.clear()
        torch.manual_seed(0)
        model = tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer)).train()
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["}"])]
        with accuracy_reward(num_workers=1) as reward:
            trainer = HybridGRPOTrainer(model=model, reward_funcs=[reward, distinct_words],
                                        args=grpo_args(tmp_path / str(overlap), optim="sgd"),
                                        train_dataset=dataset, processing_class=tokenizer, overlap_scoring=overlap)
            trainer.train()
        assert bool(calls) == overlap and (not overlap or sum(calls) == 2 * 4)  # every row, once, as it finished
        rewards = [e["rewards/accuracy_reward/mean"] for e in trainer.state.log_history if "reward" in e]
        results[overlap] = (rewards, {n: p.detach().clone() for n, p in model.named_parameters()})
    assert results[True][0] == results[False][0]
    for name, value in results[False][1].items():
        assert torch.equal(results[True][1][name], value), name
