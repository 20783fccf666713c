"""Every attention call h1rl makes can run on a fused CUDA kernel (flash or memory-efficient), never the math one.

Each path a training or rollout step takes is run in bf16 (what runs on GPUs) and fp32, on CPU; every
`scaled_dot_product_attention` call is recorded and checked against PyTorch's CUDA dispatch rules
(`h1rl.bench.attention_calls.fused_kernels`). The GPU check (`python -m h1rl.bench.gpu_check`) runs the same paths
under `sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`. Also checked here: the paths give the same numbers as
a reference (the left-aligned training forward equals the masked one).
"""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from torch.nn.attention.bias import CausalBias

from h1rl.bench.attention_calls import AttentionCall, fused_kernels, record_attention_calls

DTYPES = [torch.bfloat16, torch.float32]


def model_in(dtype, layout=("t", "m2", "t"), **overrides):
    torch.manual_seed(0)
    # head_dim 16 (a multiple of 8, as every real model's), 4 query heads over 2 KV heads: grouped-query attention
    return tiny_model(layout, dtype=dtype, **overrides)


def mask_tensor(call: AttentionCall) -> bool:
    """Whether the call passes an explicit mask tensor (a `CausalBias` is a tensor subclass but no mask tensor)."""
    return isinstance(call.attn_mask, torch.Tensor) and not isinstance(call.attn_mask, CausalBias)


def assert_fused(calls: list[AttentionCall], expect: str | None = None) -> None:
    assert calls, "no attention call was recorded"
    for call in calls:
        kernels = fused_kernels(call)
        assert kernels, f"math-kernel fallback: {call.describe()}"
        if expect is not None:
            assert expect in kernels, f"expected {expect}: {call.describe()}"


def padded_training_batch(dtype):
    """TRL's layout: prompts left-padded to a common width, completions right-padded."""
    prompt, prompt_mask = left_padded_batch([5, 2, 7, 3])
    completion, completion_mask = left_padded_batch([4, 6, 1, 6])
    completion, completion_mask = completion.flip(1), completion_mask.flip(1)  # right padding
    return torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_with_left_and_right_padding(dtype):
    model = model_in(dtype).train()
    ids, mask = padded_training_batch(dtype)
    with record_attention_calls() as calls:
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        logits.float().sum().backward()
    # no mask at all: rows are left-aligned, causality keeps the pads out; bf16 reaches flash
    assert_fused(calls, expect="flash" if dtype == torch.bfloat16 else "efficient")
    assert all(c.attn_mask is None for c in calls)


def test_left_aligned_forward_equals_the_masked_forward():
    """The left-aligned path (flash) gives every real token what the padded, masked path gives it."""
    model = model_in(torch.float32, layout=("t", "m2", "i", "m2", "t"))
    ids, mask = padded_training_batch(torch.float32)
    with torch.no_grad():
        aligned = model(ids, attention_mask=mask, use_cache=False).logits
        cache = model.allocate_cache(ids.shape[0], ids.shape[1])  # with a cache: the masked path
        masked = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(aligned[real], masked[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_prefix_training_forward(dtype):
    model = model_in(dtype).train()
    prompt, prompt_mask = left_padded_batch([5, 3])
    prompt, prompt_mask = prompt.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0)
    completion, completion_mask = left_padded_batch([4, 2, 6, 1, 3, 6])
    ids = torch.cat([prompt, completion.flip(1)], 1)
    mask = torch.cat([prompt_mask, completion_mask.flip(1)], 1)
    with record_attention_calls() as calls, model.model.sharing_prefix(prompt.shape[1]):
        model(ids, attention_mask=mask, use_cache=False).logits.float().sum().backward()
    assert_fused(calls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_with_left_padding(dtype):
    """transformers' generate: a left-padded prefill under a cache, then one-token steps over the KV buffer."""
    model = model_in(dtype)
    ids, mask = left_padded_batch([5, 2, 7])
    with record_attention_calls() as calls, torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert_fused(calls)
    decode = [c for c in calls if mask_tensor(c) and c.attn_mask.shape[2] == 1]
    assert len(decode) == 3 * 2  # 3 decode steps x 2 attention layers, queries folded: (B, Hkv, G, P)
    assert all(c.query.shape[1] == c.key.shape[1] for c in decode)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_continuation_without_padding(dtype):
    """A chunk continuing from a cached prefix (chunked prefill): lower-right causal attention, no mask tensor."""
    model = model_in(dtype)
    ids = torch.randint(1, 97, (3, 9))
    cache = model.allocate_cache(3, 9)
    with record_attention_calls() as calls, torch.no_grad():
        model(ids[:, :5], cache=cache, use_cache=True)
        model(ids[:, 5:], cache=cache, use_cache=True)
    assert_fused(calls, expect="flash" if dtype == torch.bfloat16 else "efficient")
    assert not any(mask_tensor(c) for c in calls)
    assert any(isinstance(c.attn_mask, CausalBias) for c in calls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window(dtype):
    model = model_in(dtype, sliding_window=4)
    ids, mask = padded_training_batch(dtype)
    with record_attention_calls() as calls, torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
        model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert_fused(calls)


def test_the_rules_refuse_what_pytorch_refuses():
    """The checker itself: a mask with grouped heads (the old call) and fp32 with enable_gqa fit no fused kernel."""
    q = torch.randn(2, 4, 3, 16, dtype=torch.bfloat16)
    k = v = torch.randn(2, 2, 3, 16, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    assert fused_kernels(AttentionCall(q, k, v, mask, False, True)) == set()
    assert fused_kernels(AttentionCall(q.float(), k.float(), v.float(), None, True, True)) == set()
    assert fused_kernels(AttentionCall(q, k, v, None, True, True)) == {"flash"}
    assert fused_kernels(AttentionCall(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), mask, False, False)) == {
        "efficient"}
    assert fused_kernels(AttentionCall(q, k, v, None, True, False)) == set()  # grouped heads without enable_gqa
    causal_rect = AttentionCall(q[:, :, :2], k, v, None, True, True)  # is_causal with T != S: not flash
    assert "flash" not in fused_kernels(causal_rect)
