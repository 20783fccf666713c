"""The task tokenizer: lossless, digits one token each, task words single tokens, chat template and loss mask."""

from __future__ import annotations

import re

import pytest

from h1rl.data.arithmetic import ArithmeticTask, to_chat
from h1rl.data.tokenizer import EOS, PAD, SPECIAL_TOKENS, task_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(task_corpus(n_per_level=300))


def test_training_is_deterministic(tokenizer):
    again = train_tokenizer(task_corpus(n_per_level=300))
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) <= 512
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token == PAD and tokenizer.eos_token == EOS


def test_roundtrip_is_exact_for_task_and_foreign_text(tokenizer):
    rows = ArithmeticTask(3, seed=2).generate(50, "test")
    for text in [r["question"] for r in rows] + [r["solution"] for r in rows] + ["Ünïcode ✓ 12.5% {x}\n\ttab"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_numbers_are_one_token_per_digit_and_task_words_one_token(tokenizer):
    for number in ("7", "19", "305"):
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(f"x = {number}")["input_ids"])
        assert len(pieces) == 2 + len(number), pieces
    rows = ArithmeticTask(3, seed=2).generate(100, "train")
    words = {w for r in rows for w in re.findall(r" [A-Za-z]+", r["question"])}
    assert all(len(tokenizer(w)["input_ids"]) == 1 for w in words), [w for w in words
                                                                      if len(tokenizer(w)["input_ids"]) > 1]
    assert tokenizer.convert_ids_to_tokens(tokenizer("\\boxed{7}")["input_ids"]) == ["\\boxed{", "7", "}"]


def test_chat_template_prompt_prefix_and_assistant_mask(tokenizer):
    row = ArithmeticTask(3, seed=2).generate(1, "test")[0]
    messages = to_chat(row, system_prompt="Solve it.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (f"<|system|>\nSolve it.<|end|>\n<|user|>\n{row['question']}<|end|>\n"
                    f"<|assistant|>\n{row['solution']}<|end|>\n")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert ids[: len(prompt)] == list(prompt)
    assistant = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(assistant) == row["solution"] + EOS  # the loss covers the solution and the stop token
    assert tokenizer.decode(prompt).endswith("<|assistant|>\n")
    split = [{"role": "user", "content": "q"},
             {"role": "assistant", "reasoning_content": "1 + 1 = 2", "content": "\\boxed{2}"}]
    rendered = tokenizer.apply_chat_template(split, tokenize=False)
    assert rendered.endswith("<|assistant|>\n1 + 1 = 2\n\\boxed{2}<|end|>\n")
    with pytest.raises(Exception, match="unknown chat role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_load(tokenizer, tmp_path):
    from h1rl.data.tokenizer import load_tokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "Mia has seven apples.\n7 + 1 = 8"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template and loaded.padding_side == "left"
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
