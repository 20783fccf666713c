"""The reward-function contract (TRL's), and `checked`, which enforces it with errors that name the culprit.

A reward function is called as `f(prompts=..., completions=..., completion_ids=..., **kwargs)` and returns one
reward per completion: a number, or None for "not applicable to this sample". `kwargs` holds every dataset column
(one value per completion) plus, from TRL 1.16's GRPOTrainer, `trainer_state`, `log_extra(column, values)` and
`log_metric(name, value)` (and `environments` when the trainer has them), so a function should accept `**kwargs`.
`async def` functions are allowed; TRL runs them concurrently. TRL names a function's logs after its `__name__`.

`checked(f)` wraps `f` (keeping it sync or async, and its name) so that a broken reward fails loudly and precisely:
`RewardError` names the function and, where one is to blame, the sample, for
- an exception: the batch is then re-run one sample at a time (with `log_extra` / `log_metric` muted) to find which
  samples raise; the error lists them, chained to the original exception;
- a result that is not a sequence, or of the wrong length;
- an entry that is not a real number or None (a string, a tensor, ...), or is NaN or infinite (TRL reads NaN as
  "not applicable": return None for that).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

_TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric")  # passed whole, never split per sample


class RewardError(RuntimeError):
    """A reward function broke the contract; the message names the function and, when it can, the sample."""


def validate_rewards(func_name: str, rewards: Any, num_samples: int) -> list[float | None]:
    """Check one reward function's output for `num_samples` completions; return it as floats (None kept).

    >>> validate_rewards("my_reward", [1, None, 0.5], 3)
    [1.0, None, 0.5]
    >>> validate_rewards("my_reward", [1.0, float("nan")], 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    h1rl.rewards.contract.RewardError: reward function 'my_reward' returned NaN for sample 1; return None ...
    """
    if hasattr(rewards, "tolist") and not isinstance(rewards, (list, tuple)):  # numpy array, torch tensor
        rewards = rewards.tolist()
    if not isinstance(rewards, (list, tuple)):
        raise RewardError(
            f"reward function '{func_name}' returned a {type(rewards).__name__}; expected a list with one reward per "
            f"completion ({num_samples})"
        )
    if len(rewards) != num_samples:
        raise RewardError(
            f"reward function '{func_name}' returned {len(rewards)} rewards for {num_samples} completions; it must "
            "return exactly one per completion (None where it does not apply)"
        )
    out: list[float | None] = []
    for i, value in enumerate(rewards):
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, numbers.Real):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise RewardError(
                f"reward function '{func_name}' returned {shown} (a {type(value).__name__}) for sample {i}; rewards "
                "must be real numbers or None"
            )
        value = float(value)
        if math.isnan(value):
            raise RewardError(
                f"reward function '{func_name}' returned NaN for sample {i}; return None for a sample the reward "
                "does not apply to"
            )
        if math.isinf(value):
            raise RewardError(f"reward function '{func_name}' returned {value} for sample {i}; rewards must be finite")
        out.append(value)
    return out


def checked(func: Callable) -> CheckedReward:
    """Wrap a reward function so that contract violations raise `RewardError` (see the module docstring).

    The wrapper keeps `func`'s `__name__` (for TRL's logs) and is async exactly when `func` is; `.func` is `func`.

    >>> from h1rl.rewards import checked
    >>> def has_answer(completions, **kwargs):
    ...     return [1.0 if "answer" in c else 0.0 for c in completions]
    >>> checked(has_answer)(prompts=["q", "q"], completions=["the answer is 2", "hm"], completion_ids=[[1], [2]])
    [1.0, 0.0]
    >>> def broken(completions, **kwargs):
    ...     return [len(c) / len(c.split("x")[1]) for c in completions]
    >>> checked(broken)(prompts=["q", "q"], completions=["1x1", "2"], completion_ids=[[1], [2]])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    h1rl.rewards.contract.RewardError: reward function 'broken' raised IndexError: ... on sample 1 (1 of 2 samples ...
    """
    if isinstance(func, CheckedReward):
        return func
    return AsyncCheckedReward(func) if _is_async(func) else CheckedReward(func)


class CheckedReward:
    """A reward function whose results are validated; see `checked`."""

    def __init__(self, func: Callable):
        self.func = func
        self.__name__ = _callable_name(func)

    def __call__(self, **kwargs: Any) -> list[float | None]:
        n = _num_samples(self.__name__, kwargs)
        try:
            rewards = self.func(**kwargs)
        except Exception as exc:
            failing = [i for i in range(n) if _raises(self.func, _one_sample(kwargs, i, n))]
            raise _raised(self.__name__, exc, failing, n, kwargs) from exc
        return validate_rewards(self.__name__, rewards, n)

    def __repr__(self) -> str:
        return f"checked({self.func!r})"


class AsyncCheckedReward(CheckedReward):
    """`checked` of an `async def` reward function: awaits it, then validates."""

    async def __call__(self, **kwargs: Any) -> list[float | None]:
        n = _num_samples(self.__name__, kwargs)
        try:
            rewards = await self.func(**kwargs)
        except Exception as exc:
            failing = []
            for i in range(n):
                try:
                    await self.func(**_one_sample(kwargs, i, n))
                except Exception:
                    failing.append(i)
            raise _raised(self.__name__, exc, failing, n, kwargs) from exc
        return validate_rewards(self.__name__, rewards, n)


def _num_samples(name: str, kwargs: dict[str, Any]) -> int:
    if "completions" not in kwargs:
        raise RewardError(f"reward function '{name}' was called without completions= (call it as TRL does)")
    return len(kwargs["completions"])


def _one_sample(kwargs: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """Sample i's slice of a batch's keyword arguments; trainer hooks become no-ops."""
    out = {}
    for key, value in kwargs.items():
        if key in ("log_extra", "log_metric"):
            out[key] = _ignore
        elif key not in _TRAINER_KWARGS and isinstance(value, list) and len(value) == n:
            out[key] = value[i : i + 1]
        else:
            out[key] = value
    return out


def _ignore(*args: Any, **kwargs: Any) -> None:
    pass


def _raises(func: Callable, kwargs: dict[str, Any]) -> bool:
    try:
        func(**kwargs)
    except Exception:
        return True
    return False


def _raised(name: str, exc: Exception, failing: list[int], n: int, kwargs: dict[str, Any]) -> RewardError:
    what = f"reward function '{name}' raised {type(exc).__name__}: {exc}"
    if not failing:
        return RewardError(f"{what} on a batch of {n} samples (no sample fails alone)")
    shown = ", ".join(map(str, failing[:10])) + (", ..." if len(failing) > 10 else "")
    where = f"sample {shown}" if len(failing) == 1 else f"samples [{shown}]"
    completion = repr(kwargs["completions"][failing[0]])
    completion = completion if len(completion) <= 120 else completion[:117] + "..."
    return RewardError(
        f"{what} on {where} ({len(failing)} of {n} samples fail alone; completion {failing[0]}: {completion})"
    )


def _callable_name(func: Callable) -> str:
    # As TRL's get_callable_name: partials name their function, instances without __name__ their class.
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _is_async(func: Callable) -> bool:
    # As TRL's is_async_callable: an async callable instance carries the `async` on its __call__.
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)
