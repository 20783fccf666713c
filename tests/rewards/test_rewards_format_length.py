"""Boxed-answer extraction, format_reward and overlong_penalty on hand-made cases; the modules' `>>>` examples."""

from __future__ import annotations

import doctest
import pickle
import time
from pathlib import Path

import pytest
from trl.rewards import get_soft_overlong_punishment

import h1rl.rewards.accuracy
import h1rl.rewards.contract
import h1rl.rewards.format
import h1rl.rewards.length
import h1rl.rewards.text
from h1rl.rewards import format_reward, overlong_penalty
from h1rl.rewards.text import boxed_spans, last_boxed, split_completion


@pytest.mark.parametrize(
    "module",
    [h1rl.rewards.text, h1rl.rewards.format, h1rl.rewards.length, h1rl.rewards.contract, h1rl.rewards.accuracy],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_guide_examples_run():
    guide = Path(__file__).parents[2] / "docs" / "rewards.md"
    result = doctest.testfile(str(guide), module_relative=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "text, answer",
    [
        (r"\boxed{42}", "42"),
        (r"a \boxed{1} b \boxed{\frac{1}{2}} c", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed{\boxed{3}}", r"\boxed{3}"),  # nested: the outer one
        (r"\boxed{3} and \boxed{4", "3"),  # the unclosed one is ignored
        (r"\\boxed{3}", None),  # a LaTeX line break, then a plain brace group
        ("no box", None),
        ("", None),
    ],
)
def test_last_boxed(text, answer):
    assert last_boxed(text) == answer


def test_boxed_scan_is_linear_on_adversarial_text():
    for text in (r"\boxed{" * 20_000, "{" * 100_000, r"\boxed{" + "}" * 100_000, "\\" * 100_000):
        start = time.monotonic()
        boxed_spans(text)
        assert time.monotonic() - start < 0.5


def test_split_completion_rejects_malformed_input():
    assert split_completion([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == (None, "hi")
    assert split_completion([{"role": "user", "content": "only a user turn"}]) == (None, "")
    with pytest.raises(TypeError, match="completion 3 is a int"):
        split_completion(5, index=3)


THINK = [
    (r"<think>2+2 is 4</think> The answer is $\boxed{4}$.", 1.0),
    ("\n<think>\nreason\n</think>\n\n\\boxed{4}\n", 1.0),
    (r"reason (the template opened the tag)</think>\boxed{4}", 1.0),
    (r"<think>reason</think> \[\boxed{4}\]", 1.0),
    (r"<think>reason \boxed{3}</think> \boxed{4}", 1.0),  # boxed drafts inside the reasoning are fine
    (r"<think></think> \boxed{4}", 0.0),  # empty reasoning
    (r"<think>reason \boxed{4}", 0.0),  # reasoning never closed
    (r"<think>a</think><think>b</think> \boxed{4}", 0.0),  # two reasoning blocks
    (r"words <think>reason</think> \boxed{4}", 0.0),  # opening tag not at the start
    (r"<think>reason</think> no boxed answer", 0.0),
    (r"<think>reason</think> \boxed{3} or \boxed{4}", 0.0),
    (r"<think>reason</think> \boxed{4} because ...", 0.0),  # text after the answer
    (r"<think>reason</think> \boxed{4", 0.0),  # unclosed
]


def test_format_with_reasoning_tags():
    completions, expected = zip(*THINK)
    problems = {}
    assert format_reward()(completions=list(completions), log_extra=problems.__setitem__) == list(expected)
    assert problems["format_reward_problem"][0] == "ok"
    assert problems["format_reward_problem"][-2] == "text after the boxed answer"


def test_format_chat_and_split_reasoning():
    reward = format_reward()
    completions = [
        [{"role": "assistant", "content": r"<think>r</think>\boxed{1}"}],
        [{"role": "assistant", "reasoning_content": "r", "content": r"\boxed{1}"}],  # parser split the reasoning
        [{"role": "assistant", "reasoning_content": "r", "content": r"</think>\boxed{1}"}],
        [{"role": "assistant", "reasoning_content": "", "content": r"\boxed{1}"}],  # nothing was split off
    ]
    assert reward(completions=completions) == [1.0, 1.0, 0.0, 0.0]


def test_format_custom_tags_and_no_tags():
    reward = format_reward(reasoning_tags=("<reasoning>", "</reasoning>"))
    assert reward(completions=[r"<reasoning>r</reasoning>\boxed{1}", r"<think>r</think>\boxed{1}"]) == [1.0, 0.0]
    plain = format_reward(reasoning_tags=None)
    completions = [r"so \boxed{1}.", r"\boxed{1} \boxed{1}", r"\boxed{1} done", "nothing", r"<think>r</think>\boxed{1}"]
    assert plain(completions=completions) == [1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="reasoning_tags"):
        format_reward(reasoning_tags=("<think>", ""))


def test_overlong_penalty_matches_dapo():
    penalty = overlong_penalty(max_length=100, cache_length=20)
    lengths = [0, 80, 81, 90, 99, 100, 101, 500]
    expected = [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert penalty(completion_ids=[[7] * n for n in lengths]) == pytest.approx(expected)
    cliff = overlong_penalty(max_length=10, cache_length=0)
    assert cliff(completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]


@pytest.mark.parametrize("max_length", [1, 2, 7, 100, 4096])
@pytest.mark.parametrize("cache_frac", [0.0, 0.25, 0.5, 1.0])
def test_overlong_penalty_equals_trl(max_length, cache_frac):
    """Same values as TRL's `get_soft_overlong_punishment` (exactly) on every length around and between the
    boundaries; only the log name differs. Picklable, like TRL's (its async rollout worker pickles rewards)."""
    cache_length = int(max_length * cache_frac)
    free = max_length - cache_length
    around = [free - 1, free, free + 1, (free + max_length) // 2, max_length - 1, max_length, max_length + 1]
    lengths = sorted({n for n in [0, 1, *around, 3 * max_length] if n >= 0})
    ids = [[5] * n for n in lengths]
    ours = overlong_penalty(max_length, cache_length)
    trl_reward = get_soft_overlong_punishment(max_completion_len=max_length, soft_punish_cache=cache_length)
    assert ours(completion_ids=ids) == trl_reward(ids)
    assert pickle.loads(pickle.dumps(ours))(completion_ids=ids) == trl_reward(ids)
    assert all(-1.0 <= r <= 0.0 for r in ours(completion_ids=ids))
    assert ours.__name__ == "overlong_penalty" and trl_reward.__name__ == "soft_overlong_punishment_reward"


def test_overlong_penalty_checks_its_arguments():
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(max_length=10, cache_length=11)
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(max_length=10, cache_length=-1)
    with pytest.raises(ValueError, match="max_length"):
        overlong_penalty(max_length=0, cache_length=0)
    with pytest.raises(ValueError, match="max_length must be an integer"):
        overlong_penalty(max_length=10.5, cache_length=2)
    with pytest.raises(ValueError, match="cache_length must be an integer"):
        overlong_penalty(max_length=10, cache_length=True)
    with pytest.raises(ValueError, match="completion_ids"):
        overlong_penalty(10, 2)(completions=["a"])
    # what the checks guard against: TRL takes such options and penalizes an empty completion
    assert get_soft_overlong_punishment(10, 20)([[]]) == [-0.5]
