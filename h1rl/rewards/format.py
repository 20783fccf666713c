r"""`format_reward`: 1.0 when a completion has the expected structure (reasoning, then one final `\boxed{}` answer),
else 0.0. No partial credit: a structure reward that pays for halves is easy to game.

The structure, with the default `reasoning_tags=("<think>", "</think>")`:
1. reasoning: non-empty text closed by exactly one `</think>`. The opening `<think>` is optional (many chat templates
   put it in the prompt), but if present it appears once, at the very start. For chat completions whose reasoning a
   response parser already split off (`reasoning_content` / `thinking`), that field is the reasoning and the
   content must hold no tags.
2. answer, after `</think>`: exactly one balanced `\boxed{...}`, which ends the completion: only whitespace and
   closing `$`, `.`, `\]`, `\)` may follow it.

With `reasoning_tags=None` only rule 2 applies, to the whole completion: a single boxed answer at the end.

Why a completion failed goes, through TRL's `log_extra`, into a `format_reward_problem` column of the completions
table ("ok" when it passed).
"""

from __future__ import annotations

import re
from typing import Any

from h1rl.rewards.text import boxed_spans, split_completion

_TAIL = re.compile(r"(?:\s|\$|\.|\\\]|\\\))*")  # what may follow the final boxed answer


def format_reward(reasoning_tags: tuple[str, str] | None = ("<think>", "</think>")) -> FormatReward:
    r"""Reward 1.0 for "reasoning, then one final `\boxed{}` answer", else 0.0 (rules in the module docstring).

    Args:
        reasoning_tags: the (opening, closing) tags around the reasoning, or None to require only a single boxed
            answer that ends the completion.

    Example:
    >>> from h1rl.rewards import format_reward
    >>> reward = format_reward()
    >>> reward(completions=[
    ...     r"<think>2 + 2 = 4</think> The answer is $\boxed{4}$.",
    ...     r"2 + 2 = 4</think> \boxed{4}",                     # the template opened <think>
    ...     r"<think>2 + 2 = 4</think> \boxed{4} or \boxed{5}",  # two answers
    ...     r"<think>2 + 2 = 4 \boxed{4}",                       # reasoning never closed
    ... ])
    [1.0, 1.0, 0.0, 0.0]
    >>> format_reward(reasoning_tags=None)(completions=[r"2 + 2 = \boxed{4}", r"\boxed{4}, I think"])
    [1.0, 0.0]
    """
    return FormatReward(reasoning_tags)


class FormatReward:
    """The callable `format_reward` returns."""

    __name__ = "format_reward"

    def __init__(self, reasoning_tags: tuple[str, str] | None = ("<think>", "</think>")):
        if reasoning_tags is not None and (len(reasoning_tags) != 2 or not all(reasoning_tags)):
            raise ValueError(f"format_reward: reasoning_tags must be two non-empty strings, got {reasoning_tags!r}")
        self.reasoning_tags = None if reasoning_tags is None else tuple(reasoning_tags)

    def __call__(self, completions: list[str] | list[list[dict[str, Any]]], log_extra=None, **kwargs) -> list[float]:
        problems = [self.problem(*split_completion(c, i)) for i, c in enumerate(completions)]
        if log_extra is not None:
            log_extra(f"{self.__name__}_problem", [p or "ok" for p in problems])
        return [0.0 if p else 1.0 for p in problems]

    def problem(self, reasoning: str | None, content: str) -> str | None:
        """What is wrong with one completion, or None when its structure is right."""
        if self.reasoning_tags is None:
            return _answer_problem(content)
        start, end = self.reasoning_tags
        if reasoning is not None:  # split off by a response parser
            if not reasoning.strip():
                return "empty reasoning"
            if start in content or end in content:
                return f"{start} or {end} in the answer"
            return _answer_problem(content)
        if content.count(end) != 1:
            return f"{content.count(end)} {end} tags (expected 1)"
        thought, answer = content.split(end)
        if start in thought:
            if thought.count(start) > 1 or thought.lstrip().find(start) != 0:
                return f"{start} not once at the start"
            thought = thought.lstrip()[len(start) :]
        if not thought.strip():
            return "empty reasoning"
        if start in answer:
            return f"{start} after {end}"
        return _answer_problem(answer)


def _answer_problem(answer: str) -> str | None:
    spans = boxed_spans(answer)
    if len(spans) != 1:
        return f"{len(spans)} boxed answers (expected 1)"
    if not _TAIL.fullmatch(answer, spans[0][1]):
        return "text after the boxed answer"
    return None
