r"""The bundled synthetic reasoning task: multi-step arithmetic word problems with step-by-step solutions.

A problem is a start value and a chain of operations, told as a short story with the numbers written in words; its
solution is one equation per step, in digits, then the answer boxed:

    question: "Mia has seven apples. She gets twelve more. She gives away three. She doubles them.
               How many apples does Mia have now?"
    solution: "7 + 12 = 19\n19 - 3 = 16\n16 * 2 = 32\n\boxed{32}"
    answer:   "32"
    expression: "((7 + 12) - 3) * 2"

Solving one means reading the numbers out of words, choosing each operation from its verb, carrying the running
value and doing two-digit arithmetic token by token: short (prompts and solutions of a few dozen tokens), checkable
by math-verify through `h1rl.rewards.accuracy_reward`, and hard enough for a small model to get wrong sometimes.

The difficulty knob (`Difficulty`, or a level in `LEVELS`) sets how many operations a problem has, how large its
operands and running values may be, and which multipliers appear.

Splits never overlap, whatever the seeds: a problem belongs to "test" when a SHA-256 hash of its `expression` (the
arithmetic alone, not the names or wording) falls in the first `test_fraction` of the hash range, else to "train".
`ArithmeticTask.generate(n, split)` draws problems from a generator seeded by (seed, split) and keeps the first `n`
distinct expressions that belong to the split, so a train problem and a test problem never share their arithmetic.

Rows are plain dicts (what jsonl files and `datasets` hold): `question`, `solution`, `answer` (a string),
`expression`, `num_ops`. `to_chat` turns a row into chat messages; `write_jsonl` / `read_jsonl` store rows.

Run `python -m h1rl.data.arithmetic --n 3` to print a few problems.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "test")
DEFAULT_TEST_FRACTION = 0.1

# Story pieces. Every problem is told with one name (and its pronoun) and one kind of item.
NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Sam", "He"), ("Lea", "She"), ("Max", "He")]
ITEMS = ["apples", "coins", "books", "cards", "stones", "shells"]
ADD_PHRASES = ["{p} gets {n} more.", "{p} buys {n} more.", "{p} finds {n} more."]
SUB_PHRASES = ["{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}."]
MUL_PHRASES = {2: "{p} doubles them.", 3: "{p} triples them."}
MUL_PHRASE = "{p} multiplies them by {n}."  # any other factor

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


@dataclass(frozen=True)
class Difficulty:
    """What problems of one difficulty look like. Every value along a problem's chain stays in 1..max_value."""

    min_ops: int  # fewest operations per problem
    max_ops: int  # most operations per problem (drawn uniformly in [min_ops, max_ops])
    max_operand: int  # start values and +/- operands are drawn from 2..max_operand and 1..max_operand
    max_value: int  # no running value (nor the answer) exceeds this
    factors: tuple[int, ...] = ()  # multipliers for "*" steps; empty: no multiplication

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"Difficulty: need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 2 <= self.max_operand <= self.max_value:
            raise ValueError(
                f"Difficulty: need 2 <= max_operand <= max_value, got {self.max_operand}, {self.max_value}"
            )
        if self.max_value > 999_999:
            raise ValueError(f"Difficulty: max_value {self.max_value} is above 999999 (numbers are spelt in words)")
        if any(f < 2 for f in self.factors):
            raise ValueError(f"Difficulty: factors must be >= 2, got {self.factors}")


# Levels 1 (one or two small steps) to 5 (up to six steps, three-digit values). The bundled teacher is trained and
# measured at DEFAULT_LEVEL.
LEVELS: dict[int, Difficulty] = {
    1: Difficulty(min_ops=1, max_ops=2, max_operand=10, max_value=30),
    2: Difficulty(min_ops=2, max_ops=3, max_operand=12, max_value=50, factors=(2,)),
    3: Difficulty(min_ops=2, max_ops=4, max_operand=20, max_value=99, factors=(2, 3)),
    4: Difficulty(min_ops=3, max_ops=5, max_operand=30, max_value=199, factors=(2, 3, 4)),
    5: Difficulty(min_ops=4, max_ops=6, max_operand=99, max_value=999, factors=(2, 3, 4, 5)),
}
DEFAULT_LEVEL = 3


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 999999: 42 -> "forty-two", 305 -> "three hundred five"."""
    if not 0 <= n <= 999_999:
        raise ValueError(f"number_to_words: {n} is outside 0..999999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{number_to_words(thousands)} thousand" + (f" {number_to_words(rest)}" if rest else "")


def split_of(expression: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """The split ("train" or "test") that a problem with this expression belongs to; independent of any seed."""
    digest = hashlib.sha256(expression.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2**64 else "train"


@dataclass
class ArithmeticTask:
    """Problem generator: `ArithmeticTask(difficulty=3, seed=0).generate(100, "test")`.

    `difficulty` is a level of `LEVELS` (1..5) or a `Difficulty`. `seed` seeds the draws; which problems may appear in
    which split does not depend on it (see the module docstring), so any two seeds give disjoint train and test sets.
    """

    difficulty: int | Difficulty = DEFAULT_LEVEL
    seed: int = 0
    test_fraction: float = DEFAULT_TEST_FRACTION  # share of the problem space reserved for "test"
    spec: Difficulty = field(init=False)

    def __post_init__(self):
        if isinstance(self.difficulty, Difficulty):
            self.spec = self.difficulty
        elif isinstance(self.difficulty, int) and self.difficulty in LEVELS:
            self.spec = LEVELS[self.difficulty]
        else:
            raise ValueError(f"ArithmeticTask: difficulty must be a level {sorted(LEVELS)} or a Difficulty, "
                             f"got {self.difficulty!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"ArithmeticTask: test_fraction must be in (0, 1), got {self.test_fraction}")

    def generate(self, n: int, split: str = "train") -> list[dict[str, Any]]:
        """`n` problems of `split` with distinct expressions, the same list for the same (difficulty, seed, split)."""
        if split not in SPLITS:
            raise ValueError(f"ArithmeticTask.generate: split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"ArithmeticTask.generate: n must be >= 0, got {n}")
        rng = random.Random(f"h1rl-arithmetic/{self.seed}/{split}")  # str seeds are stable across processes
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        attempts, budget = 0, 100 * n + 10_000
        while len(rows) < n:
            attempts += 1
            if attempts > budget:
                raise ValueError(
                    f"ArithmeticTask: found only {len(rows)} distinct {split!r} problems of {self.spec} in {budget} "
                    f"draws, {n} were asked for; ask for fewer or raise the difficulty"
                )
            row = self.draw(rng)
            if row["expression"] in seen or split_of(row["expression"], self.test_fraction) != split:
                continue
            seen.add(row["expression"])
            rows.append(row)
        return rows

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """One random problem (of either split) as a row."""
        spec = self.spec
        start = value = rng.randint(2, spec.max_operand)
        steps: list[tuple[str, int]] = []
        for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
            choices = []
            if value < spec.max_value:
                choices.append("+")
            if value >= 2:
                choices.append("-")
            if any(value * f <= spec.max_value for f in spec.factors):
                choices.append("*")
            op = rng.choice(choices)
            if op == "+":
                operand = rng.randint(1, min(spec.max_operand, spec.max_value - value))
            elif op == "-":
                operand = rng.randint(1, min(spec.max_operand, value - 1))
            else:
                operand = rng.choice([f for f in spec.factors if value * f <= spec.max_value])
            steps.append((op, operand))
            value = apply_op(value, op, operand)
        name, pronoun = rng.choice(NAMES)
        item = rng.choice(ITEMS)
        return render(start, steps, name, pronoun, item, rng)


def apply_op(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand if op == "-" else value * operand


def render(start: int, steps: list[tuple[str, int]], name: str, pronoun: str, item: str,
           rng: random.Random) -> dict[str, Any]:
    """A problem row from its chain and story pieces (phrases drawn with `rng`)."""
    sentences = [f"{name} has {number_to_words(start)} {item}."]
    lines, expression, value = [], str(start), start
    for op, operand in steps:
        if op == "+":
            phrase = rng.choice(ADD_PHRASES)
        elif op == "-":
            phrase = rng.choice(SUB_PHRASES)
        else:
            phrase = MUL_PHRASES.get(operand, MUL_PHRASE)
        sentences.append(phrase.format(p=pronoun, n=number_to_words(operand)))
        new = apply_op(value, op, operand)
        lines.append(f"{value} {op} {operand} = {new}")
        expression = f"({expression}) {op} {operand}" if len(lines) > 1 else f"{expression} {op} {operand}"
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"\\boxed{{{value}}}")
    return {
        "question": " ".join(sentences),
        "solution": "\n".join(lines),
        "answer": str(value),
        "expression": expression,
        "num_ops": len(steps),
    }


def make_splits(
    n_train: int, n_test: int, difficulty: int | Difficulty = DEFAULT_LEVEL, seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, list[dict[str, Any]]]:
    """`{"train": [...], "test": [...]}` from one `ArithmeticTask`: disjoint by construction."""
    task = ArithmeticTask(difficulty, seed, test_fraction)
    return {"train": task.generate(n_train, "train"), "test": task.generate(n_test, "test")}


def to_chat(row: dict[str, Any], system_prompt: str | None = None, with_solution: bool = True) -> list[dict[str, str]]:
    """Chat messages for a row: [system?], user (the question), and assistant (the solution) when `with_solution`."""
    for key in ("question",) + (("solution",) if with_solution else ()):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ValueError(f"to_chat: row needs a non-empty string {key!r}, got keys {sorted(row)}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": row["question"]})
    if with_solution:
        messages.append({"role": "assistant", "content": row["solution"]})
    return messages


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as one JSON object per line (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a line that is not a JSON object is an error naming the file and line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON: {err}") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h1rl.data.arithmetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--difficulty", type=int, default=DEFAULT_LEVEL, choices=sorted(LEVELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the rows to this jsonl file instead of printing them")
    args = parser.parse_args(argv)
    rows = ArithmeticTask(args.difficulty, args.seed).generate(args.n, args.split)
    if args.out:
        print(f"{len(rows)} rows written to {write_jsonl(rows, args.out)}")
    else:
        for row in rows:
            print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
