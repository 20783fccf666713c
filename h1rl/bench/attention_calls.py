"""Which fused CUDA kernel each of h1rl's attention calls can reach, checked on any machine.

`record_attention_calls()` records the arguments of every `scaled_dot_product_attention` call made by h1rl's
attention (`h1rl.models.attention.attend` is its one call site); `fused_kernels(call)` applies PyTorch's CUDA
dispatch rules for the flash and memory-efficient kernels (`aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`,
`can_use_flash_attention` / `can_use_mem_efficient_attention`) to one recorded call. A call that fits neither runs
on the math kernel, which materialises the (T, S) scores in fp32 (8 GiB per row per layer at 8k tokens). The tests
(`tests/models/test_attention_kernels.py`) run every attention path in bf16 and fp32 on CPU and require a fused
kernel for each call; on a GPU, `python -m h1rl.bench.gpu_check` runs the same paths under
`sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`, where a math fallback raises.

The rules, as of PyTorch 2.13, taking the conservative side where versions differ:
- flash: no explicit mask; fp16 or bf16; q, k, v with equal head dims <= 256; `is_causal` only when T == S (a causal
  continuation uses a lower-right `CausalBias`, which dispatches to flash with its own causal flag); query heads a
  multiple of the KV heads, with `enable_gqa` when they differ; non-empty sequences; last dimension contiguous.
- memory-efficient: a mask is allowed (bool, or the query's dtype); fp16, bf16 or fp32; head dims equal and a
  multiple of 8 (fp16/bf16) or 4 (fp32); equal query and KV head counts (older releases' kernel has no grouped-query
  support, and the docs still say so); last dimension contiguous; storage offsets aligned to that many elements.
Hardware limits (sm80+ for flash, which H100/H200 meet) are not modelled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

HALF = (torch.float16, torch.bfloat16)


@dataclass
class AttentionCall:
    """The arguments of one SDPA call that decide its kernel."""

    query: torch.Tensor  # (B, H, T, P)
    key: torch.Tensor  # (B, Hkv, S, P)
    value: torch.Tensor
    attn_mask: torch.Tensor | CausalBias | None
    is_causal: bool
    enable_gqa: bool

    def describe(self) -> str:
        mask = "none" if self.attn_mask is None else (
            f"CausalBias({self.attn_mask.variant.name})" if isinstance(self.attn_mask, CausalBias)
            else f"{tuple(self.attn_mask.shape)} {self.attn_mask.dtype}")
        return (f"q {tuple(self.query.shape)} k {tuple(self.key.shape)} {self.query.dtype}, mask {mask}, "
                f"is_causal {self.is_causal}, enable_gqa {self.enable_gqa}")


def _last_dim_contiguous(*ts: torch.Tensor, ignore_singleton: bool) -> bool:
    return all(t.stride(-1) == 1 or (ignore_singleton and t.shape[-1] == 1) for t in ts)


def _flash_ok(q, k, v, is_causal: bool, enable_gqa: bool) -> bool:
    P = q.shape[-1]
    if q.dtype not in HALF or not (P == k.shape[-1] == v.shape[-1] <= 256):
        return False
    if is_causal and q.shape[-2] != k.shape[-2]:
        return False
    H, Hkv = q.shape[1], k.shape[1]
    heads_ok = H == Hkv == v.shape[1] or (enable_gqa and Hkv == v.shape[1] and H % Hkv == 0)
    lengths_ok = q.shape[-2] > 0 and k.shape[-2] > 0
    return heads_ok and lengths_ok and _last_dim_contiguous(q, k, v, ignore_singleton=True)


def _efficient_ok(q, k, v, mask) -> bool:
    if q.dtype not in (*HALF, torch.float32):
        return False
    align = 8 if q.dtype in HALF else 4
    P, Pv = q.shape[-1], v.shape[-1]
    if P != k.shape[-1] or P % align or Pv % align:
        return False
    if not q.shape[1] == k.shape[1] == v.shape[1]:
        return False
    if not (q.shape[-2] > 0 and k.shape[-2] > 0) or not _last_dim_contiguous(q, k, v, ignore_singleton=False):
        return False
    if any(t.storage_offset() % align for t in (q, k, v)):
        return False
    if isinstance(mask, torch.Tensor):
        if mask.dtype not in (torch.bool, q.dtype):
            return False
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return False
    return True


def fused_kernels(call: AttentionCall) -> set[str]:
    """The fused CUDA kernels ("flash", "efficient") that PyTorch's dispatcher could pick for `call`."""
    q, k, v, mask = call.query, call.key, call.value, call.attn_mask
    kernels = set()
    if isinstance(mask, CausalBias):
        square = mask.seq_len_q == mask.seq_len_kv or mask.variant == CausalVariant.UPPER_LEFT
        if _flash_ok(q, k, v, is_causal=square, enable_gqa=call.enable_gqa):
            kernels.add("flash")
        if _efficient_ok(q, k, v, None):  # a custom (lower-right) causal mask type, no bias tensor
            kernels.add("efficient")
        return kernels
    if mask is None and _flash_ok(q, k, v, call.is_causal, call.enable_gqa):
        kernels.add("flash")
    if _efficient_ok(q, k, v, mask) and not (call.enable_gqa and q.shape[1] != k.shape[1]):
        kernels.add("efficient")
    return kernels


@contextmanager
def record_attention_calls() -> Iterator[list[AttentionCall]]:
    """Within the block, every SDPA call of h1rl's attention is appended to the yielded list (and still runs)."""
    import h1rl.models.attention as attention

    calls: list[AttentionCall] = []
    original = attention.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(AttentionCall(query, key, value, attn_mask, is_causal, enable_gqa))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    attention.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        attention.scaled_dot_product_attention = original
