"""GRPO improves the policy: a reduced version of the demo's RL phase whose effect is large enough to assert.

The default demo's GRPO phase (`h1rl demo`) moves greedy held-out accuracy by a few points, which is too close to
run-to-run noise to assert on another machine. This reduced version keeps every piece of that phase (the bundled
teacher as an exact all-attention hybrid, `h1rl grpo`'s `run_grpo` with the math-verify accuracy reward, rollouts
from the engine, TRL's update) on a small prompt set, trained on for many visits, and measures what GRPO optimises:
the sampled (T=1) accuracy on those prompts, 16 samples each, before and after.
"""

from __future__ import annotations

import pytest
import torch

from h1rl.assets import teacher_dir
from h1rl.data import make_splits, write_jsonl
from h1rl.eval import EvalConfig, evaluate
from h1rl.models.convert import convert_to_directory
from h1rl.rl.config import grpo_args_from_mapping
from h1rl.rl.run import run_grpo


def sampled_accuracy(model_dir, rows) -> float:
    config = EvalConfig(num_samples=16, temperature=1.0, max_completion_length=64, batch_size=len(rows), seed=123)
    return evaluate(str(model_dir), rows, config=config)["accuracy"]


@pytest.mark.slow
def test_grpo_raises_the_sampled_accuracy_of_the_bundled_teacher(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = make_splits(32, 16, difficulty=3, seed=7)["train"]
        write_jsonl([{"question": r["question"], "answer": r["answer"]} for r in rows], tmp_path / "train.jsonl")
        model = convert_to_directory(teacher_dir(), "t,t,t,t", tmp_path / "hybrid")  # exact: same function
        before = sampled_accuracy(model, rows)
        args = grpo_args_from_mapping({
            "model_name_or_path": str(model),
            "output_dir": str(tmp_path / "grpo"),
            "dataset_name": str(tmp_path / "train.jsonl"), "prompt_column": "question", "answer_column": "answer",
            "reward_funcs": ["accuracy"],
            "learning_rate": 1e-4, "num_generations": 8, "per_device_train_batch_size": 64,
            "max_completion_length": 64, "max_steps": 40, "save_strategy": "no", "logging_steps": 5, "seed": 0,
            "beta": 0.0, "disable_tqdm": True,
        })
        run_grpo(args)
        after = sampled_accuracy(tmp_path / "grpo" / "final", rows)
    finally:
        torch.set_num_threads(threads)
    print(f"sampled accuracy on the {len(rows)} training prompts: {before:.3f} -> {after:.3f}")
    assert after >= before + 0.08, (before, after)
