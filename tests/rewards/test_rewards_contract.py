"""checked() / validate_rewards(): every contract violation names the function and the sample; None passes."""

from __future__ import annotations

import asyncio
import functools
import inspect
import pickle

import numpy as np
import pytest
import torch

from h1rl.rewards import RewardError, checked, format_reward, validate_rewards

BATCH = {
    "prompts": ["p0", "p1", "p2"],
    "completions": ["a", "bb", "ccc"],
    "completion_ids": [[1], [1, 2], [1, 2, 3]],
    "answer": ["x", "y", "z"],
    "trainer_state": None,
}


def by_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_valid_rewards_pass_and_none_is_kept():
    def some_none(completions, **kwargs):
        return [None, 1, np.float32(0.5)]

    assert checked(by_length)(**BATCH) == [1.0, 2.0, 3.0]
    assert checked(some_none)(**BATCH) == [None, 1.0, 0.5]
    assert validate_rewards("f", np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    assert validate_rewards("f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]


def test_checked_keeps_the_name_and_is_idempotent():
    wrapped = checked(by_length)
    assert wrapped.__name__ == "by_length" and wrapped.func is by_length
    assert checked(wrapped) is wrapped
    assert checked(functools.partial(by_length)).__name__ == "by_length"
    assert checked(format_reward()).__name__ == "format_reward"
    assert pickle.loads(pickle.dumps(checked(format_reward())))(**BATCH) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1.0, 2.0], r"'bad' returned 2 rewards for 3 completions"),
        ([1.0, "2", 3.0], r"'bad' returned '2' \(a str\) for sample 1"),
        ([1.0, 2.0, torch.tensor(3.0)], r"'bad' returned tensor\(3\.\) \(a Tensor\) for sample 2"),
        ([float("nan"), 2.0, 3.0], r"'bad' returned NaN for sample 0; return None"),
        ([1.0, float("-inf"), 3.0], r"'bad' returned -inf for sample 1"),
        (1.0, r"'bad' returned a float; expected a list"),
        ("abc", r"'bad' returned a str"),
    ],
)
def test_bad_results_name_function_and_sample(returned, message):
    def bad(completions, **kwargs):
        return returned

    with pytest.raises(RewardError, match=message):
        checked(bad)(**BATCH)


def test_an_exception_names_the_samples_that_raise():
    def fragile(completions, answer, **kwargs):
        return [1.0 / (len(c) - 2) for c in completions]  # sample 1 ("bb") divides by zero

    with pytest.raises(RewardError, match=r"'fragile' raised ZeroDivisionError: .* on sample 1 \(1 of 3") as info:
        checked(fragile)(**BATCH)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_an_exception_on_every_sample_and_on_the_batch_only():
    def strict(completions, **kwargs):  # no **kwargs in the right place: fails whatever the sample
        raise KeyError("solution")

    with pytest.raises(RewardError, match=r"'strict' raised KeyError: 'solution' on samples \[0, 1, 2\] \(3 of 3"):
        checked(strict)(**BATCH)

    def batch_only(completions, **kwargs):
        if len(completions) > 1:
            raise ValueError("batch too large")
        return [0.0]

    with pytest.raises(RewardError, match="'batch_only' raised ValueError: batch too large on a batch of 3 samples"):
        checked(batch_only)(**BATCH)


def test_reruns_mute_trainer_hooks():
    logged = []

    def logs_then_fails(completions, log_extra, **kwargs):
        log_extra("col", list(completions))
        raise RuntimeError("boom")

    with pytest.raises(RewardError, match="samples \\[0, 1, 2\\]"):
        checked(logs_then_fails)(**BATCH, log_extra=lambda column, values: logged.append(values))
    assert logged == [["a", "bb", "ccc"]]  # only the real call logged


def test_async_rewards_stay_async():
    async def judge(completions, **kwargs):
        await asyncio.sleep(0)
        return [None if c == "a" else 1.0 for c in completions]

    async def bad_judge(completions, **kwargs):
        await asyncio.sleep(0)
        if "ccc" in completions:
            raise TimeoutError("judge did not answer")
        return [1.0] * len(completions)

    wrapped = checked(judge)
    assert inspect.iscoroutinefunction(wrapped.__call__) and wrapped.__name__ == "judge"
    assert asyncio.run(wrapped(**BATCH)) == [None, 1.0, 1.0]
    with pytest.raises(RewardError, match="'bad_judge' raised TimeoutError: judge did not answer on sample 2"):
        asyncio.run(checked(bad_judge)(**BATCH))
