"""Distillation data: text and chat rows, assistant-only labels, no packing (one sample per row), clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from h1rl.data.tokenizer import load_tokenizer
from h1rl.distill.config import DataConfig
from h1rl.distill.data import build_dataset, calibration_batches, make_collator


def write_rows(tmp_path, rows) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHAT = [{"role": "user", "content": "Mia has two apples. She gets three more."},
        {"role": "assistant", "content": "2 + 3 = 5\n\\boxed{5}"}]


def test_text_and_chat_rows_and_assistant_mask(tmp_path):
    tok = load_tokenizer(padding_side="right")
    path = write_rows(tmp_path, [{"text": "2 + 3 = 5"}, {"messages": CHAT}])
    ds = build_dataset(path, tok, DataConfig(dataset_name=path))
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert ds[0]["input_ids"] == tok("2 + 3 = 5")["input_ids"] + [tok.eos_token_id]  # EOS appended
    assert ds[1]["labels"] == ds[1]["input_ids"]

    path2 = write_rows(tmp_path, [{"messages": CHAT}])
    masked = build_dataset(path2, tok, DataConfig(dataset_name=path2, assistant_only_loss=True))[0]
    kept = [t for t, lab in zip(masked["input_ids"], masked["labels"]) if lab != -100]
    assert tok.decode(kept) == "2 + 3 = 5\n\\boxed{5}<|end|>"


def test_prompt_and_completion_columns_become_a_conversation(tmp_path):
    """Rows of a question and its worked solution (GSM8K's question / answer, the arithmetic task's question /
    solution) are distilled as [system?, user, assistant] conversations."""
    tok = load_tokenizer(padding_side="right")
    path = write_rows(tmp_path, [{"question": CHAT[0]["content"], "solution": CHAT[1]["content"], "answer": "5"}])
    config = DataConfig(dataset_name=path, prompt_column="question", completion_column="solution",
                        system_prompt="Be brief.", assistant_only_loss=True)
    row = build_dataset(path, tok, config)[0]
    system = [{"role": "system", "content": "Be brief."}]
    assert row["input_ids"] == tok.apply_chat_template(system + CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]).startswith("2 + 3 = 5")
    with pytest.raises(ValueError, match="set both"):
        DataConfig(dataset_name=path, prompt_column="question")
    bad = write_rows(tmp_path, [{"question": "q", "solution": ""}])
    with pytest.raises(ValueError, match=r"row 0: column 'solution' \(completion_column\) must be non-empty text"):
        build_dataset(bad, tok, DataConfig(dataset_name=bad, prompt_column="question", completion_column="solution"))


def test_no_packing_each_row_is_one_sample(tmp_path):
    tok = load_tokenizer(padding_side="right")
    rows = [{"messages": CHAT}, {"text": "1 + 1 = 2"}, {"text": "1 + 1 = 2\n2 + 2 = 4\n4 + 4 = 8"}]
    path = write_rows(tmp_path, rows)
    ds = build_dataset(path, tok, DataConfig(dataset_name=path, max_length=8))
    batch = make_collator(tok)([ds[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 8)
    for i in range(3):
        n = len(ds[i]["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ds[i]["input_ids"]  # the sample, alone, from position 0
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (8 - n)  # right padding
        assert torch.all(batch["input_ids"][i, n:] == tok.pad_token_id)
        assert torch.all(batch["labels"][i, n:] == -100)
    assert len(ds[0]["input_ids"]) == 8  # truncated to max_length, not spilled into another row
    batches = calibration_batches(ds, make_collator(tok), num_samples=3, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]


def test_bad_rows_name_file_and_row(tmp_path):
    tok = load_tokenizer(padding_side="right")
    path = write_rows(tmp_path, [{"text": "1 + 1 = 2"}, {"prompt": "x"}])
    with pytest.raises(ValueError, match=r"rows.jsonl row 1: has neither 'text' nor 'messages' \(columns"):
        build_dataset(path, tok, DataConfig(dataset_name=path))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="the tokenizer's template has none"):
        build_dataset(path, tok, DataConfig(dataset_name=path, assistant_only_loss=True))
    (tmp_path / "rows.txt").write_text("1 + 1 = 2\n")
    with pytest.raises(ValueError, match=r"rows.txt: unsupported file type '.txt'"):
        build_dataset(str(tmp_path / "rows.txt"), tok, DataConfig(dataset_name="unused"))
    with pytest.raises(FileNotFoundError, match=r"data: .*missing.jsonl does not exist"):
        build_dataset(str(tmp_path / "missing.jsonl"), tok, DataConfig(dataset_name="unused"))
