r"""`overlong_penalty`: DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), from completion token counts.

With `L = len(completion_ids)`, `L_max = max_length` and `L_cache = cache_length`:

    0                                  if L <= L_max - L_cache
    (L_max - L_cache - L) / L_cache    if L_max - L_cache < L <= L_max     (falls linearly from 0 to -1)
    -1                                 if L > L_max

It only penalizes, never rewards brevity. Set `max_length` to GRPOConfig's `max_completion_length`: completions
are cut there, so a truncated completion gets -1 through the middle case. `cache_length=0` gives a hard cliff
(0 up to `L_max`, -1 beyond).

The values are TRL's: `OverlongPenalty` calls `trl.rewards.get_soft_overlong_punishment(max_length, cache_length)`,
which computes exactly this (same token count, same boundaries, same float expression; tested on a grid). What this
wrapper adds, and why it is not TRL's function used directly:
- the log key: `__name__` is `overlong_penalty` (TRL's is `soft_overlong_punishment_reward`), so TRL logs
  `rewards/overlong_penalty/mean` under the name h1rl's configs and docs use;
- the option names `max_length` / `cache_length` (a recipe's `rewards: [{name: length, options: {...}}]`);
- checked options: TRL accepts any numbers, and a `cache_length` above `max_length` gives an empty completion a
  penalty, a negative one makes the soft zone vanish; here both, non-integers and `max_length < 1` are errors;
- a missing `completion_ids` is an error that says what is missing (TRL's raises a bare TypeError).
"""

from __future__ import annotations

from typing import Any

from trl.rewards import get_soft_overlong_punishment


def overlong_penalty(max_length: int, cache_length: int) -> OverlongPenalty:
    r"""DAPO's soft overlong penalty in [-1, 0] from `completion_ids` lengths (formula in the module docstring).

    Example:
    >>> from h1rl.rewards import overlong_penalty
    >>> penalty = overlong_penalty(max_length=100, cache_length=20)
    >>> penalty(completion_ids=[[1] * 80, [1] * 90, [1] * 100, [1] * 101])
    [0.0, -0.5, -1.0, -1.0]
    """
    return OverlongPenalty(max_length, cache_length)


class OverlongPenalty:
    """The callable `overlong_penalty` returns: TRL's soft overlong punishment under h1rl's name, options checked."""

    __name__ = "overlong_penalty"

    def __init__(self, max_length: int, cache_length: int):
        for name, value in (("max_length", max_length), ("cache_length", cache_length)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"overlong_penalty: {name} must be an integer (tokens), got {value!r}")
        if max_length < 1:
            raise ValueError(f"overlong_penalty: max_length must be >= 1, got {max_length}")
        if not 0 <= cache_length <= max_length:
            raise ValueError(
                f"overlong_penalty: cache_length must lie in [0, max_length={max_length}]: got {cache_length}"
            )
        self.max_length = max_length
        self.cache_length = cache_length
        self._trl = get_soft_overlong_punishment(max_completion_len=max_length, soft_punish_cache=cache_length)

    def __call__(self, completion_ids: list[list[int]] | None = None, **kwargs: Any) -> list[float]:
        if completion_ids is None:
            raise ValueError("overlong_penalty needs completion_ids (the completions' token ids, which TRL passes)")
        return self._trl(completion_ids)

    def __repr__(self) -> str:
        return f"overlong_penalty(max_length={self.max_length}, cache_length={self.cache_length})"
