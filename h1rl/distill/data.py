"""Distillation data: load rows (local json/jsonl/parquet or a hub dataset), tokenize texts or chat conversations,
pad batches. Samples are never packed.

Each row holds either plain text (`data.text_field`, default "text"; the tokenizer's EOS is appended) or a chat
conversation (`data.messages_field`, default "messages": a list of `{"role", "content"}`), rendered with the
tokenizer's chat template (the teacher's reasoning traces, typically). A row becomes `input_ids`, `attention_mask`
and `labels` (= input_ids; with `assistant_only_loss`, -100 outside assistant turns, found through the template's
`{% generation %}` markers as transformers and TRL do), truncated to `max_length`.

No packing: each batch row is exactly one sample, right-padded by transformers' `DataCollatorForSeq2Seq` (pad id
in `input_ids`, 0 in `attention_mask`, -100 in `labels`). So no Mamba state is carried from one sample into the
next: state runs along a row, and padding sits after the row's last real token (the mixers also zero pad tokens).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from h1rl.distill.config import DataConfig

_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_rows(path: str, split: str = "train", max_samples: int | None = None) -> datasets.Dataset:
    """Rows from a local file, a local directory of data files, or a hub dataset name (first `max_samples`)."""
    local = Path(path)
    if local.is_file():
        if local.suffix not in _LOADERS:
            raise ValueError(f"data file {path}: unsupported extension {local.suffix!r}; use one of {sorted(_LOADERS)}")
        ds = datasets.load_dataset(_LOADERS[local.suffix], data_files=str(local), split="train")
    elif local.is_dir():
        ds = datasets.load_dataset(str(local), split=split)
    else:
        ds = datasets.load_dataset(path, split=split)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"data {path} (split {split!r}) has no rows")
    return ds


def tokenize_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, config: DataConfig, where: str) -> dict:
    """One row -> `{"input_ids", "attention_mask", "labels"}` lists (see the module docstring); `where` names the
    row in errors."""
    text, messages = row.get(config.text_field), row.get(config.messages_field)
    if text is not None:
        if config.assistant_only_loss:
            raise ValueError(f"{where}: assistant_only_loss needs chat rows ({config.messages_field!r}), got text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    elif messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"{where}: {config.messages_field!r} must be a list of {{'role', 'content'}} messages")
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=config.assistant_only_loss
        )
        ids = list(out["input_ids"])
        if config.assistant_only_loss:
            labels = [t if keep else -100 for t, keep in zip(ids, out["assistant_masks"])]
        else:
            labels = list(ids)
    else:
        raise ValueError(
            f"{where}: has neither {config.text_field!r} nor {config.messages_field!r} "
            f"(columns: {sorted(row)}; set data.text_field or data.messages_field)"
        )
    ids, labels = ids[: config.max_length], labels[: config.max_length]
    if not ids:
        raise ValueError(f"{where}: tokenizes to no tokens")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_dataset(
    path: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig, max_samples: int | None = None
) -> datasets.Dataset:
    """The tokenized rows of `path` (columns input_ids, attention_mask, labels only)."""
    if config.assistant_only_loss and not _GENERATION_TAG.search(tokenizer.chat_template or ""):
        raise ValueError(
            "data.assistant_only_loss needs a chat template with {% generation %} ... {% endgeneration %} around "
            "assistant content; the tokenizer's template has none (set data.assistant_only_loss=false)"
        )
    rows = load_rows(path, config.split, max_samples)

    def tokenize(row, idx):
        return tokenize_row(row, tokenizer, config, f"data {path} row {idx}")

    return rows.map(tokenize, with_indices=True, remove_columns=rows.column_names, desc=f"tokenizing {path}")


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Right-pads each batch to its longest row: one sample per row, labels -100 on padding. No packing."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its EOS) before distilling")
    if tokenizer.padding_side != "right":
        raise ValueError(f"training batches are right-padded; got tokenizer.padding_side={tokenizer.padding_side!r}")
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")


def calibration_batches(
    ds: datasets.Dataset, collator: DataCollatorForSeq2Seq, num_samples: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """The first `num_samples` rows of `ds` as padded batches (for importance scores and stage metrics)."""
    rows = [ds[i] for i in range(min(num_samples, len(ds)))]
    return [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
