"""Distillation data: rows (read by `h1rl.data.loading`: a local json/jsonl/parquet/csv file or a hub dataset),
tokenized texts or chat conversations, padded batches. Samples are never packed.

Each row holds either plain text (`data.dataset_text_field`, default "text"; the tokenizer's EOS is appended), a
chat conversation (`data.messages_column`, default "messages": a list of `{"role", "content"}`; the teacher's
reasoning traces, typically), or, with `data.prompt_column` and `data.completion_column`, a prompt and its
completion (a question and its worked solution) made into the conversation [system?, user, assistant]. Conversations
are rendered with the tokenizer's chat template. A row becomes `input_ids`, `attention_mask`
and `labels` (= input_ids; with `assistant_only_loss`, -100 outside assistant turns, found through the template's
`{% generation %}` markers as transformers and TRL do), truncated to `max_length`.

No packing: each batch row is exactly one sample, right-padded by transformers' `DataCollatorForSeq2Seq` (pad id
in `input_ids`, 0 in `attention_mask`, -100 in `labels`). So no Mamba state is carried from one sample into the
next: state runs along a row, and padding sits after the row's last real token (the mixers also zero pad tokens).
"""

from __future__ import annotations

import re
from typing import Any

import datasets
import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from h1rl.data.loading import chat_messages, load_rows
from h1rl.distill.config import DataConfig

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def tokenize_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, config: DataConfig, where: str) -> dict:
    """One row -> `{"input_ids", "attention_mask", "labels"}` lists (see the module docstring); `where` names the
    row in errors."""
    if config.prompt_column is not None:
        messages = chat_messages(row, config.prompt_column, config.completion_column, config.system_prompt, where)
        text = None
    else:
        text, messages = row.get(config.dataset_text_field), row.get(config.messages_column)
    if text is not None:
        if config.assistant_only_loss:
            raise ValueError(f"{where}: assistant_only_loss needs chat rows ({config.messages_column!r}), got text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    elif messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"{where}: {config.messages_column!r} must be a list of {{'role', 'content'}} messages")
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
            f"{where}: has neither {config.dataset_text_field!r} nor {config.messages_column!r} "
            f"(columns: {sorted(row)}; set data.dataset_text_field, data.messages_column, or data.prompt_column and "
            "data.completion_column)"
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
    rows = load_rows(path, config.dataset_train_split, config.dataset_config, max_samples, where="data")

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
