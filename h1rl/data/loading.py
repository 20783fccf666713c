r"""Loading the rows that `h1rl grpo`, `h1rl distill`, `h1rl eval` and the demo train or evaluate on: the one place
that reads datasets, maps their columns and extracts reference answers.

    rows = load_rows("openai/gsm8k", dataset_config="main", split="train")  # a hub dataset (datasets.load_dataset)
    rows = load_rows("data/train.jsonl")                                    # a local .json / .jsonl / .parquet / .csv
    problems = load_problems("data/train.jsonl", prompt_column="question", answer_column="answer")

Where rows come from (`load_rows`): a name with a local data suffix is a file and must exist; an existing directory
is read by `datasets.load_dataset(dir)`; anything else is a hub dataset name. `max_samples` keeps the first rows.

Problems (`load_problems`, for GRPO and evaluation) get a `prompt` column, what TRL's GRPOTrainer reads: the
`prompt_column`'s text as chat messages ([system?, user], with `chat`), or its messages as they are, or the plain
text (`chat=False`). Their `answer_column` holds the reference answer, extracted per `answer_format`:

| answer_format | the column holds | the answer | example |
|---|---|---|---|
| `gsm8k` | a solution ending `#### N` (GSM8K) | N, without thousands separators | `#### 1,234` -> `1234` |
| `boxed` | a solution with `\boxed{}` (MATH) | the last `\boxed{}`'s inside | `\boxed{\frac{1}{2}}` -> `\frac{1}{2}` |
| `plain` | the answer itself | the text, stripped (numbers as text) | `32` -> `32` |
| `auto` (default) | any of these | `gsm8k` if the text has `####`, else `boxed` if it has `\boxed{`, else `plain` | |

Other columns are kept (TRL hands every column to the reward functions). Chat rows for distillation
(`chat_messages`) are made from a prompt column and a completion column (a question and its worked solution) when a
dataset has no conversations of its own. A missing column is an error that names the option, the column and the
columns that exist; a row that cannot be used is an error that names the dataset and the row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ANSWER_FORMATS = ("auto", "gsm8k", "boxed", "plain")
_GSM8K_MARK = "####"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def load_rows(dataset_name: str | Path, split: str = "train", dataset_config: str | None = None,
              max_samples: int | None = None, where: str = "dataset_name"):
    """The rows of a local file, a local directory of data files or a hub dataset (`datasets.Dataset`), the first
    `max_samples` of them. `where` names the option in errors."""
    import datasets

    path = Path(dataset_name)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {dataset_name} does not exist")
        rows = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    elif path.is_file():
        raise ValueError(f"{where}: {dataset_name}: unsupported file type {path.suffix!r}; use one of "
                         f"{', '.join(LOCAL_FORMATS)} (or a hub dataset name)")
    elif path.is_dir():
        rows = datasets.load_dataset(str(path), name=dataset_config, split=split)
    else:
        rows = datasets.load_dataset(str(dataset_name), name=dataset_config, split=split)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    if len(rows) == 0:
        raise ValueError(f"{where}: {dataset_name} (split {split!r}) has no rows")
    return rows


def check_columns(columns: list[str], wanted: dict[str, str | None], name: str) -> None:
    """ValueError when a column that an option names (`wanted`: option -> column; None: not used) is missing."""
    missing = {option: column for option, column in wanted.items() if column is not None and column not in columns}
    if missing:
        raise ValueError(f"{name}: missing column(s) {list(missing.values())} ({' / '.join(missing)}); the dataset "
                         f"has {list(columns)}")


def extract_answer(value: Any, answer_format: str = "auto") -> str | None:
    r"""The reference answer in `value` (see the module docstring's table); None when the format's marker is absent.

    >>> extract_answer("She has 3 + 4 = 7 apples.\n#### 7"), extract_answer("#### 1,234", "gsm8k")
    ('7', '1234')
    >>> extract_answer(r"so $x = \boxed{\frac{1}{2}}$"), extract_answer(" 32 "), extract_answer(5)
    ('\\frac{1}{2}', '32', '5')
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format: expected one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if answer_format == "auto":
        answer_format = "gsm8k" if _GSM8K_MARK in text else "boxed" if "\\boxed{" in text else "plain"
    if answer_format == "gsm8k":
        if _GSM8K_MARK not in text:
            return None
        return _THOUSANDS.sub("", text.rsplit(_GSM8K_MARK, 1)[1].strip())
    if answer_format == "boxed":
        from h1rl.rewards.text import last_boxed

        boxed = last_boxed(text)
        return None if boxed is None else boxed.strip()
    return text.strip()


def prompt_messages(prompt: Any, system_prompt: str | None = None, chat: bool = True, where: str = "prompt"
                    ) -> str | list[dict[str, Any]]:
    """A prompt as the trainer and the evaluator take it: text becomes [system?, user] messages (`chat`), a list of
    chat messages is kept as it is; anything else, or empty text, is a ValueError naming `where`."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: empty prompt")
        if not chat:
            return prompt
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return prompt
    raise ValueError(f"{where}: the prompt must be text or a list of chat messages, got {type(prompt).__name__}")


def prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    """The question a prompt asks: its text, or the content of its last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def load_problems(dataset_name: Any, prompt_column: str = "prompt", answer_column: str = "answer",
                  answer_format: str = "auto", system_prompt: str | None = None, chat: bool = True,
                  split: str = "train", dataset_config: str | None = None, max_samples: int | None = None,
                  where: str = "dataset_name"):
    """Problems with a `prompt` column and the extracted reference answer in `answer_column` (module docstring),
    from a dataset name or path (`load_rows`), a `datasets.Dataset`, or a list of row dicts (returned as a list)."""
    import datasets

    if isinstance(dataset_name, (str, Path)):
        rows, name = load_rows(dataset_name, split, dataset_config, max_samples, where), str(dataset_name)
    elif isinstance(dataset_name, datasets.Dataset):
        rows, name = dataset_name, f"<Dataset of {len(dataset_name)} rows>"
    else:
        rows, name = list(dataset_name), f"<{type(dataset_name).__name__} of {len(dataset_name)} rows>"
        rows = rows[:max_samples] if max_samples is not None else rows
        if not rows:
            raise ValueError(f"{where}: {name} has no rows")
    columns = rows.column_names if isinstance(rows, datasets.Dataset) else sorted(rows[0])
    check_columns(columns, {"prompt_column": prompt_column, "answer_column": answer_column}, name)

    def shape(row: dict[str, Any], index: int) -> dict[str, Any]:
        at = f"{name}: row {index}"
        if prompt_column not in row:  # a list of rows whose keys differ
            raise ValueError(f"{at}: no column {prompt_column!r} (prompt_column); its columns are {sorted(row)}")
        answer = extract_answer(row.get(answer_column), answer_format)
        if answer is None:
            kind = {"gsm8k": "'#### N' answer", "boxed": "\\boxed{} answer"}.get(answer_format, "answer")
            raise ValueError(f"{at}: column {answer_column!r} has no {kind} (answer_format {answer_format}): "
                             f"{str(row.get(answer_column))[-80:]!r}")
        prompt = prompt_messages(row[prompt_column], system_prompt, chat, f"{at}: column {prompt_column!r}")
        return {"prompt": prompt, answer_column: answer}

    if isinstance(rows, list):
        return [{**row, **shape(row, i)} for i, row in enumerate(rows)]
    if prompt_column != "prompt" and "prompt" in rows.column_names:
        rows = rows.remove_columns("prompt")
    return rows.map(shape, with_indices=True, desc=f"prompts of {name}")


def chat_messages(row: dict[str, Any], prompt_column: str, completion_column: str, system_prompt: str | None = None,
                  where: str = "row") -> list[dict[str, str]]:
    """A prompt / completion row as a conversation: [system?, user: prompt, assistant: completion]."""
    for option, column in (("prompt_column", prompt_column), ("completion_column", completion_column)):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: column {column!r} ({option}) must be non-empty text, got {value!r}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": row[prompt_column]},
                       {"role": "assistant", "content": row[completion_column]}]
