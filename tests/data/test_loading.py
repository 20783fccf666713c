r"""`h1rl.data.loading`, the one dataset loader of grpo, distill and eval: local files of every format and
directories, column checks that name the option and the columns that exist, GSM8K's `#### N` and MATH's `\boxed{}`
answers, prompts as chat messages."""

from __future__ import annotations

import json

import pytest

from h1rl.data.loading import chat_messages, extract_answer, load_problems, load_rows, prompt_messages, prompt_text

ROWS = [{"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "What is 1,000 + 234?", "answer": "1,000 + 234 = 1,234\n#### 1,234"}]


def write(tmp_path, rows, suffix):
    import datasets

    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_of_every_format_give_the_same_rows(tmp_path, suffix):
    rows = load_rows(write(tmp_path, ROWS, suffix))
    assert [dict(r) for r in rows] == ROWS
    assert len(load_rows(write(tmp_path, ROWS, suffix), max_samples=1)) == 1


def test_a_directory_of_data_files_is_a_dataset(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", ROWS, ".jsonl")
    assert load_rows(tmp_path / "data", split="train")["question"] == [r["question"] for r in ROWS]


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_name: .*missing.jsonl does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "rows.txt").write_text("x\n")
    with pytest.raises(ValueError, match=r"rows.txt: unsupported file type '.txt'; use one of .json, .jsonl"):
        load_rows(tmp_path / "rows.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(Exception):  # noqa: B017  (datasets refuses an empty json file)
        load_rows(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("value, answer_format, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "auto", "72"),  # GSM8K
    ("#### 1,234,567", "gsm8k", "1234567"),  # thousands separators dropped
    ("#### -3.5", "auto", "-3.5"),
    (r"so the answer is $\boxed{\frac{1}{2}}$.", "auto", r"\frac{1}{2}"),  # MATH: the last boxed answer
    (r"first \boxed{3}, then \boxed{ 4 }", "boxed", "4"),
    (r"\boxed{\{1, 2\}}", "auto", r"\{1, 2\}"),
    (" 32 ", "auto", "32"),  # the answer itself
    (32, "auto", "32"),
    ("#### 7", "plain", "#### 7"),
    ("no marker here", "gsm8k", None),
    ("no box here", "boxed", None),
    (None, "auto", None),
])
def test_answers_in_the_hubs_formats(value, answer_format, expected):
    assert extract_answer(value, answer_format) == expected


def test_problems_get_chat_prompts_and_extracted_answers(tmp_path):
    path = write(tmp_path, ROWS, ".jsonl")
    problems = load_problems(str(path), prompt_column="question", system_prompt="Be brief.")
    assert problems["answer"] == ["7", "1234"]
    assert problems[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": ROWS[0]["question"]}]
    assert problems[0]["question"] == ROWS[0]["question"]  # the other columns stay (TRL hands them to rewards)
    as_list = load_problems([dict(r) for r in ROWS], prompt_column="question", chat=False, max_samples=1)
    assert as_list == [{**ROWS[0], "prompt": ROWS[0]["question"], "answer": "7"}]
    messages = [{"role": "user", "content": "hi"}]
    assert load_problems([{"prompt": messages, "answer": "1"}])[0]["prompt"] == messages  # messages kept as they are
    assert prompt_text(problems[1]["prompt"]) == ROWS[1]["question"]


def test_bad_columns_and_rows_are_named(tmp_path):
    path = write(tmp_path, ROWS, ".jsonl")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['problem'\] \(prompt_column\); the dataset has "
                                         r"\['question', 'answer'\]"):
        load_problems(str(path), prompt_column="problem")
    with pytest.raises(ValueError, match=r"row 1: column 'question': empty prompt"):
        load_problems([{"question": "q", "answer": "1"}, {"question": " ", "answer": "2"}], prompt_column="question")
    with pytest.raises(ValueError, match=r"row 0: column 'answer' has no \\boxed\{\} answer \(answer_format boxed\)"):
        load_problems(str(path), prompt_column="question", answer_format="boxed")
    with pytest.raises(ValueError, match="answer_format: expected one of auto, gsm8k, boxed, plain"):
        extract_answer("1", "latex")
    with pytest.raises(ValueError, match="prompt must be text or a list of chat messages, got int"):
        prompt_messages(3)


def test_prompt_and_completion_as_a_conversation():
    row = {"question": "q", "solution": "s"}
    assert chat_messages(row, "question", "solution", "sys") == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "s"}]
    with pytest.raises(ValueError, match=r"row 3: column 'answer' \(completion_column\) must be non-empty text"):
        chat_messages(row, "question", "answer", where="row 3")
