"""Distillation data: text and chat rows, assistant-only labels, no packing (one sample per row), clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from h1rl.distill.config import DataConfig
from h1rl.distill.data import build_dataset, calibration_batches, make_collator
from h1rl.distill.toy import build_tokenizer


def write_rows(tmp_path, rows) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHAT = [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "count 3 4 5 . answer 5"}]


def test_text_and_chat_rows_and_assistant_mask(tmp_path):
    tok = build_tokenizer()
    path = write_rows(tmp_path, [{"text": "count 1 2 3"}, {"messages": CHAT}])
    ds = build_dataset(path, tok, DataConfig(path=path))
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert tok.convert_ids_to_tokens(ds[0]["input_ids"]) == ["count", "1", "2", "3", "<|end|>"]  # EOS appended
    assert ds[1]["labels"] == ds[1]["input_ids"]

    path2 = write_rows(tmp_path, [{"messages": CHAT}])
    masked = build_dataset(path2, tok, DataConfig(path=path2, assistant_only_loss=True))[0]
    kept = [tok.convert_ids_to_tokens(t) for t, lab in zip(masked["input_ids"], masked["labels"]) if lab != -100]
    assert kept == ["count", "3", "4", "5", ".", "answer", "5", "<|end|>"]


def test_no_packing_each_row_is_one_sample(tmp_path):
    tok = build_tokenizer()
    rows = [{"messages": CHAT}, {"text": "count 1"}, {"text": "count 1 2 3 4 5 6"}]
    path = write_rows(tmp_path, rows)
    ds = build_dataset(path, tok, DataConfig(path=path, max_length=8))
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
    tok = build_tokenizer()
    path = write_rows(tmp_path, [{"text": "count 1"}, {"prompt": "x"}])
    with pytest.raises(ValueError, match=r"rows.jsonl row 1: has neither 'text' nor 'messages' \(columns"):
        build_dataset(path, tok, DataConfig(path=path))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="the tokenizer's template has none"):
        build_dataset(path, tok, DataConfig(path=path, assistant_only_loss=True))
    (tmp_path / "rows.txt").write_text("count 1\n")
    with pytest.raises(ValueError, match=r"rows.txt: unsupported extension '.txt'"):
        build_dataset(str(tmp_path / "rows.txt"), tok, DataConfig(path="unused"))
