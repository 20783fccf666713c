"""The arithmetic task: answers checked independently of the generator, disjoint splits, determinism, difficulty."""

from __future__ import annotations

import re

import pytest

from h1rl.data.arithmetic import (
    LEVELS,
    ArithmeticTask,
    Difficulty,
    make_splits,
    number_to_words,
    read_jsonl,
    split_of,
    to_chat,
    write_jsonl,
)

# ---- an independent reader of the questions: words -> numbers, verbs -> operations -----------------------------

UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}


def words_to_number(text: str) -> int:
    total, current = 0, 0
    for word in text.replace("-", " ").split():
        if word in UNITS:
            current += UNITS[word]
        elif word in TENS:
            current += TENS[word]
        elif word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            raise AssertionError(f"not a number word: {word!r} in {text!r}")
    return total + current


NUMBER = r"([a-z][a-z -]*?)"
SENTENCES = [
    (re.compile(rf"^\w+ has {NUMBER} \w+\.$"), lambda v, n: n),
    (re.compile(rf"^(?:She|He) (?:gets|buys|finds) {NUMBER} more\.$"), lambda v, n: v + n),
    (re.compile(rf"^(?:She|He) (?:gives away|loses|sells) {NUMBER}\.$"), lambda v, n: v - n),
    (re.compile(rf"^(?:She|He) multiplies them by {NUMBER}\.$"), lambda v, n: v * n),
]


def solve(question: str) -> int:
    """Read the story sentence by sentence and carry the value, without the generator's code or fields."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    assert sentences[-1].strip().startswith("How many"), question
    value = None
    for sentence in (s.strip() for s in sentences[:-1]):
        if sentence.endswith("doubles them."):
            value *= 2
            continue
        if sentence.endswith("triples them."):
            value *= 3
            continue
        for pattern, apply in SENTENCES:
            match = pattern.match(sentence)
            if match:
                value = apply(value, words_to_number(match.group(1)))
                break
        else:
            raise AssertionError(f"unreadable sentence {sentence!r}")
    return value


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_are_right_by_an_independent_reading_and_by_python(level):
    spec = LEVELS[level]
    for row in ArithmeticTask(level, seed=1).generate(300, "train") + ArithmeticTask(level, 1).generate(30, "test"):
        answer = int(row["answer"])
        assert solve(row["question"]) == answer, row
        assert eval(row["expression"], {"__builtins__": {}}) == answer, row  # noqa: S307  (our own arithmetic)
        lines = row["solution"].split("\n")
        assert lines[-1] == f"\\boxed{{{answer}}}"
        assert len(lines) - 1 == row["num_ops"] and spec.min_ops <= row["num_ops"] <= spec.max_ops
        value = None
        for line in lines[:-1]:  # each step line is a true equation continuing from the previous result
            left, result = line.split(" = ")
            a, op, b = left.split(" ")
            assert value is None or int(a) == value, row
            assert eval(left, {"__builtins__": {}}) == int(result), line  # noqa: S307
            assert 1 <= int(result) <= spec.max_value
            value = int(result)
        assert value == answer


def test_math_verify_accepts_the_solutions_and_rejects_a_wrong_answer():
    from h1rl.rewards import accuracy_reward

    rows = ArithmeticTask(3, seed=0).generate(8, "test")
    with accuracy_reward(num_workers=1) as reward:
        right = reward(completions=[r["solution"] for r in rows], answer=[r["answer"] for r in rows])
        wrong = reward(completions=[r["solution"] for r in rows], answer=[str(int(r["answer"]) + 1) for r in rows])
    assert right == [1.0] * 8 and wrong == [0.0] * 8


def test_splits_never_overlap_across_seeds_and_sizes():
    train = {r["expression"] for seed in (0, 1) for r in ArithmeticTask(3, seed).generate(3000, "train")}
    test = {r["expression"] for seed in (0, 2) for r in ArithmeticTask(3, seed).generate(400, "test")}
    assert train and test and not train & test
    assert all(split_of(e) == "test" for e in test) and all(split_of(e) == "train" for e in train)
    splits = make_splits(500, 100, difficulty=2, seed=5)
    assert len(splits["train"]) == 500 and len(splits["test"]) == 100
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["test"]}
    assert len({r["expression"] for r in splits["train"]}) == 500  # distinct within a split


def test_same_seed_same_problems_other_seed_other_problems():
    a = ArithmeticTask(3, seed=7).generate(50, "train")
    assert a == ArithmeticTask(3, seed=7).generate(50, "train")
    assert a[:20] == ArithmeticTask(3, seed=7).generate(20, "train")  # a prefix: n does not change the draws
    assert a != ArithmeticTask(3, seed=8).generate(50, "train")


def test_test_fraction_is_roughly_the_share_of_the_space():
    expressions = [ArithmeticTask(3).draw(__import__("random").Random(i))["expression"] for i in range(4000)]
    share = sum(split_of(e, 0.1) == "test" for e in expressions) / len(expressions)
    assert 0.07 < share < 0.13


def test_difficulty_knob_changes_length_and_size():
    easy = ArithmeticTask(1).generate(300)
    hard = ArithmeticTask(5).generate(300)
    assert max(r["num_ops"] for r in easy) <= 2 and min(r["num_ops"] for r in hard) >= 4
    assert max(int(r["answer"]) for r in easy) <= 30 < max(int(r["answer"]) for r in hard)
    assert "*" not in "".join(r["solution"] for r in easy) and "*" in "".join(r["solution"] for r in hard)
    custom = ArithmeticTask(Difficulty(min_ops=5, max_ops=5, max_operand=9, max_value=40), seed=0).generate(20)
    assert {r["num_ops"] for r in custom} == {5} and "*" not in "".join(r["solution"] for r in custom)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="difficulty must be a level"):
        ArithmeticTask(9)
    with pytest.raises(ValueError, match="min_ops <= max_ops"):
        Difficulty(min_ops=3, max_ops=2, max_operand=5, max_value=10)
    with pytest.raises(ValueError, match="split must be one of"):
        ArithmeticTask().generate(1, "validation")
    tiny = Difficulty(min_ops=1, max_ops=1, max_operand=2, max_value=4)  # a handful of distinct problems
    with pytest.raises(ValueError, match="found only .* distinct 'train' problems"):
        ArithmeticTask(tiny).generate(100)


def test_number_words():
    for n in list(range(0, 130)) + [305, 999, 1000, 4021, 999_999]:
        assert words_to_number(number_to_words(n)) == n
    assert number_to_words(42) == "forty-two"


def test_chat_and_jsonl_roundtrip(tmp_path):
    rows = ArithmeticTask(2, seed=3).generate(5, "test")
    messages = to_chat(rows[0], system_prompt="Solve step by step.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == rows[0]["question"] and messages[2]["content"] == rows[0]["solution"]
    assert [m["role"] for m in to_chat(rows[0], with_solution=False)] == ["user"]
    with pytest.raises(ValueError, match="non-empty string 'question'"):
        to_chat({"solution": "x"})
    path = write_jsonl(rows, tmp_path / "sub" / "test.jsonl")
    assert read_jsonl(path) == rows
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"test.jsonl:6: not valid JSON"):
        read_jsonl(path)
