"""The TRL coupling, checked against the installed TRL: every GRPOTrainer method HybridGRPOTrainer overrides still
exists with the parameters h1rl was written against, and every TRL attribute it reads is still set. A TRL upgrade
that changes one fails here, naming the method or attribute, instead of somewhere inside a training step."""

from __future__ import annotations

import inspect

import pytest
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from h1rl.rl.trainer import TRL_HOOKS, TRL_STATE, HybridGRPOTrainer


@pytest.mark.parametrize("name", sorted(TRL_HOOKS))
def test_overridden_trl_methods_keep_their_signature(name):
    assert hasattr(GRPOTrainer, name), f"trl.GRPOTrainer.{name} no longer exists"
    parameters = tuple(inspect.signature(getattr(GRPOTrainer, name)).parameters)
    assert parameters == TRL_HOOKS[name], f"trl.GRPOTrainer.{name}{parameters} != h1rl's {TRL_HOOKS[name]}"


def test_every_override_is_listed():
    """HybridGRPOTrainer overrides exactly the listed TRL methods (and none it does not declare)."""
    overridden = {name for name in vars(HybridGRPOTrainer) if hasattr(GRPOTrainer, name) and not name.startswith("__")}
    assert overridden == set(TRL_HOOKS)


def test_trl_state_read_by_h1rl_is_set(tmp_path):
    tokenizer = tiny_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=4, max_steps=1, report_to=[], save_strategy="no")
    trainer = HybridGRPOTrainer(model=tiny_model(["t", "m2"], vocab_size=len(tokenizer)),
                                reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                                train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"]}), processing_class=tokenizer)
    missing = [name for name in TRL_STATE if not hasattr(trainer, name)]
    assert not missing, f"GRPOTrainer no longer sets {missing}"
