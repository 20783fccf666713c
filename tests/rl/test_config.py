"""HybridGRPOConfig: h1rl's settings as TRL config fields, read by HybridGRPOTrainer from its `args`; keyword
arguments override them; TRL's plain GRPOConfig gets h1rl's defaults; every field documents itself."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset
from trl import GRPOConfig

from h1rl.rl import HybridGRPOConfig, HybridGRPOTrainer
from h1rl.rl.config import HYBRID_FIELDS, GRPOScriptArguments, HybridModelConfig
from h1rl.rollout import RolloutBudget

COMMON = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=6, max_steps=2,
              learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, beta=0.0)


def first_token_parity(completion_ids, **kwargs):
    """Ties often, so that dynamic sampling has groups to refill."""
    return [float(ids[0] % 2 == 0) if ids else 0.0 for ids in completion_ids]


def trainer_for(args, **overrides) -> HybridGRPOTrainer:
    tokenizer = tiny_tokenizer()
    return HybridGRPOTrainer(model=tiny_model(["t", "m2"], vocab_size=len(tokenizer)).train(),
                             reward_funcs=first_token_parity, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"prompt": [f"what is {i}" for i in range(16)]}),
                             **overrides)


def test_the_trainer_reads_its_settings_from_the_config(tmp_path):
    args = HybridGRPOConfig(output_dir=str(tmp_path), dynamic_sampling_rounds=2, skip_zero_advantage_rows=False,
                            share_prompt_prefix=False, length_chunks=2, importance_sampling_correction=False,
                            rollout_max_rows=3, rollout_memory_gb=1.5, rollout_prefill_chunk=16, **COMMON)
    assert args.bf16 is False and args.use_cpu is True  # h1rl's defaults without CUDA
    trainer = trainer_for(args)
    assert (trainer.dynamic_sampling_rounds, trainer.skip_zero_advantage_rows, trainer.share_prompt_prefix,
            trainer.length_chunks, trainer.importance_sampling_correction) == (2, False, False, 2, False)
    assert trainer.rollout_budget == RolloutBudget(3, 1.5, 16)
    trainer.train()  # the switch reached the behaviour: dynamic sampling ran, within its 2 rounds, slots at most 3
    logs = trainer.state.log_history
    rounds = [e["dynamic_sampling/extra_rounds"] for e in logs if "dynamic_sampling/extra_rounds" in e]
    assert len(rounds) == 2 and all(r <= 2 for r in rounds)
    assert all(e["rollout/rows_at_once"] <= 3 for e in logs if "rollout/rows_at_once" in e)


def test_keyword_arguments_override_and_plain_trl_configs_get_the_defaults(tmp_path):
    args = HybridGRPOConfig(output_dir=str(tmp_path), length_chunks=2, **COMMON)
    trainer = trainer_for(args, length_chunks=3, rollout_budget=RolloutBudget(max_rows=5))
    assert trainer.length_chunks == 3 and trainer.rollout_budget == RolloutBudget(max_rows=5)
    plain = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **COMMON)
    trainer = trainer_for(plain)
    defaults = {f.name: f.default for f in dataclasses.fields(HybridGRPOConfig) if f.name in HYBRID_FIELDS}
    assert trainer.length_chunks == defaults["length_chunks"] == 4
    assert trainer.dynamic_sampling_rounds == 0 and trainer.rollout_budget == RolloutBudget()
    with pytest.raises(ValueError, match="length_chunks must be >= 1"):
        trainer_for(plain, length_chunks=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"length_chunks": 0}, "length_chunks must be >= 1 (1: one training forward)"),
    ({"rollout_memory_gb": 0.0}, "rollout_memory_gb must be > 0, or unset"),
    ({"rollout_prefill_chunk": 0}, "rollout_prefill_chunk must be >= 1"),
    ({"use_transformers_paged": True}, "h1rl generates with its own engine (continuous batching included)"),
    ({"deepspeed": "zero5"}, "deepspeed: zero5 is neither a file nor one of the bundled configs zero2, zero3"),
])
def test_bad_settings_say_how_to_fix_them(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        HybridGRPOConfig(output_dir=str(tmp_path), **{**COMMON, **kwargs})
    assert message in str(err.value)


def test_deepspeed_short_names_resolve_to_the_bundled_files(tmp_path):
    from h1rl.recipes import find

    assert HybridGRPOConfig(output_dir=str(tmp_path), deepspeed="zero2", **COMMON).deepspeed == \
        str(find("deepspeed/zero2"))


def test_every_h1rl_field_documents_meaning_default_and_source():
    for cls, names in ((HybridGRPOConfig, (*HYBRID_FIELDS, "bf16", "use_cpu")),
                       (GRPOScriptArguments, [f.name for f in dataclasses.fields(GRPOScriptArguments)]),
                       (HybridModelConfig, ("dtype", "lora_target_modules"))):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in names:
            text = fields[name].metadata.get("help", "")
            assert "efault" in text or "Required" in text, (cls.__name__, name, text)
            assert "h1rl" in text or "TRL" in text, (cls.__name__, name, text)  # where it comes from
