"""Shared test helpers: tiny hybrid configs and models built from scratch (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import h1rl  # noqa: E402,F401  (registers the Auto classes)
from h1rl.models import HybridConfig, HybridForCausalLM  # noqa: E402

LAYOUTS = {
    "mixed": ["t", "m2", "i", "m2"],
    "all_m2": ["m2", "m2"],
    "all_t": ["t", "t"],
}


def tiny_config(layout=("t", "m2", "i", "m2"), **overrides) -> HybridConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        ssm_cfg={"d_inner": 64, "d_xb": 32, "d_state": 8, "dt_rank": 8},
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return HybridConfig(num_hidden_layers=len(layout), hybrid_block_layout=list(layout), **kwargs)


def tiny_model(layout=("t", "m2", "i", "m2"), dtype=torch.float32, **overrides) -> HybridForCausalLM:
    model = HybridForCausalLM(tiny_config(layout, **overrides)).to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: no early stops that pad finished rows
    with torch.no_grad():  # non-trivial dt and gates so that the SSM state matters
        for module in model.modules():
            if hasattr(module, "dt_proj") and module.dt_proj.bias is not None:
                module.dt_proj.bias.uniform_(-3.0, 0.5)
    return model


def left_padded_batch(lengths: list[int], vocab: int = 97, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, max_len) with row i holding lengths[i] real tokens at the right; mask 1 on real tokens."""
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(1, vocab, (n,))
        mask[i, T - n :] = 1
    return ids, mask


@pytest.fixture(params=list(LAYOUTS))
def layout(request) -> list[str]:
    return LAYOUTS[request.param]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer():
    """A word-level tokenizer built in memory (no downloads): digits, a few words, chat markers, <pad>/<eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    words += [str(d) for d in range(10)] + ["+", "-", "*", "=", "what", "is", "the", "answer", "\\boxed{", "}"]
    words += [f"w{i}" for i in range(97 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
