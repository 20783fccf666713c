"""The built-in rewards and `checked` wrappers run through TRL 1.16's own reward-calling code
(`GRPOTrainer._calculate_rewards`), on a trainer object stripped to what that method reads."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from h1rl.rewards import RewardError, accuracy_reward, checked, format_reward, overlong_penalty


def bare_trainer(reward_funcs: list) -> GRPOTrainer:
    trainer = object.__new__(GRPOTrainer)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    trainer.args = SimpleNamespace(report_to=[])
    trainer.state = SimpleNamespace(global_step=0)
    trainer.reward_funcs = reward_funcs
    trainer.reward_processing_classes = [None] * len(reward_funcs)
    trainer.reward_func_names = [f.__name__ for f in reward_funcs]
    trainer.environments = None
    trainer._pending_extra_logs = defaultdict(list)
    trainer._pending_metrics = defaultdict(list)
    return trainer


@pytest.fixture
def async_loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def test_builtin_rewards_through_trl(async_loop):
    async def judge(completions, **kwargs):  # an async custom reward, as an LLM judge would be
        await asyncio.sleep(0)
        return [None, 0.5]

    with accuracy_reward(num_workers=1) as accuracy:
        funcs = [checked(accuracy), checked(format_reward()), checked(overlong_penalty(10, 4)), checked(judge)]
        trainer = bare_trainer(funcs)
        trainer.async_loop = async_loop
        completions = [
            [{"role": "assistant", "content": r"<think>1+1</think> \boxed{2}"}],
            [{"role": "assistant", "content": r"\boxed{3}"}],
        ]
        inputs = [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}] * 2
        prompts = [x["prompt"] for x in inputs]
        rewards = trainer._calculate_rewards(inputs, prompts, completions, [[1] * 5, [1] * 8])
        expected = torch.tensor([[1.0, 1.0, 0.0, float("nan")], [0.0, 0.0, -0.5, 0.5]])
        torch.testing.assert_close(rewards, expected, equal_nan=True)
        assert trainer.reward_func_names == ["accuracy_reward", "format_reward", "overlong_penalty", "judge"]
        assert trainer._pending_metrics["accuracy_reward/correct"] == [0.5]
        assert trainer._pending_extra_logs["accuracy_reward_status"] == ["correct", "wrong"]


def test_a_broken_async_reward_fails_loudly_through_trl(async_loop):
    async def judge(completions, **kwargs):
        return [1.0 if "2" in c[0]["content"] else float("nan") for c in completions]

    trainer = bare_trainer([checked(judge)])
    trainer.async_loop = async_loop
    completions = [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "3"}]]
    with pytest.raises(RewardError, match="'judge' returned NaN for sample 1"):
        trainer._calculate_rewards([{"prompt": "q"}] * 2, ["q", "q"], completions, [[1], [1]])
