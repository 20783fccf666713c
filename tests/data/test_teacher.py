"""The teacher's supervised loop: it learns (loss falls, weights move), only on assistant tokens, reproducibly."""

from __future__ import annotations

import pytest
import torch

from h1rl.data.arithmetic import ArithmeticTask
from h1rl.data.teacher import TeacherConfig, build_teacher, encode_sft, train_teacher
from h1rl.data.tokenizer import task_corpus, train_tokenizer

TINY = TeacherConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, steps=25,
                     batch_size=8, lr=1e-2, warmup_steps=2, n_train=64, log_every=0, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(task_corpus(n_per_level=100))


def test_training_lowers_the_loss_and_changes_every_weight(tokenizer):
    model = build_teacher(tokenizer, TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_teacher(model, tokenizer, TINY)
    assert len(losses) == TINY.steps
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged and not model.training


def test_same_seed_same_weights(tokenizer):
    cfg = TeacherConfig(**{**TINY.__dict__, "steps": 5})
    a, b = build_teacher(tokenizer, cfg), build_teacher(tokenizer, cfg)
    train_teacher(a, tokenizer, cfg), train_teacher(b, tokenizer, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_teacher(tokenizer, TeacherConfig(**{**cfg.__dict__, "seed": 4}))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_loss_covers_the_solution_and_stop_token_only(tokenizer):
    row = ArithmeticTask(3, seed=0).generate(1)[0]
    (ids, prompt_len), = encode_sft([row], tokenizer)
    assert tokenizer.decode(ids[prompt_len:]) == row["solution"] + "<|end|>"
    assert tokenizer.decode(ids[:prompt_len]).endswith(row["question"] + "<|end|>\n<|assistant|>\n")


def test_config_and_model_agree(tokenizer):
    model = build_teacher(tokenizer, TINY)
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.config.vocab_size == len(tokenizer) and model.config.head_dim == 16
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="must divide by num_heads"):
        TeacherConfig(hidden_size=100, num_heads=3)
