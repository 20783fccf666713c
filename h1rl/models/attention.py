"""The attention mixer of `"t"` layers: grouped-query attention with RoPE, SDPA, and h1rl's KV cache.

Weight names are Mistral's (`q_proj`, `k_proj`, `v_proj`, `o_proj`) so teachers and Apriel-H1 checkpoints load
unchanged; Llama's all-projection bias, Qwen2's q/k/v bias and Qwen3's per-head q/k RMSNorm are config switches.
RoPE (every rope type transformers knows, Llama-3 scaling included) comes from transformers' rotary embedding.

Every call is shaped for a fused kernel (`attend`, the one call site of `scaled_dot_product_attention`). On CUDA,
PyTorch's flash kernel takes no explicit mask but handles grouped-query heads itself (`enable_gqa`, fp16/bf16 only);
its memory-efficient kernel takes a mask (and fp32) but needs equal query and KV head counts; a call that fits
neither runs on the math kernel, which materialises the (T, S) scores in fp32. So:
- no mask (nothing padded, right-padded rows, or left-padded rows that the model left-aligned, see
  `h1rl.models.batch`): plain causal attention, `is_causal` when T == S and a lower-right `CausalBias` when a cached
  prefix precedes the new tokens; grouped heads through `enable_gqa` in fp16/bf16 (flash), repeated KV heads in fp32
  (memory-efficient);
- a mask (left padding under a cache, as in `generate`; a sliding window; the shared-prefix training forward): the
  memory-efficient kernel; one query token per row (decode) folds its G query heads into the query axis of their KV
  head (q (B, Hkv, G, P)), so the KV cache is never copied; several query tokens repeat the KV heads, as
  transformers does.
The mask is built here rather than by transformers' masking utilities because it combines causality over a
(possibly preallocated) KV buffer, padding given as a 2D mask, and an optional sliding window. Query rows that see
no valid key (pad positions) attend to themselves, so their (ignored) outputs stay finite.

Mixer contract shared with `h1rl.models.mamba.MambaMixer`: `forward(hidden_states, position_embeddings, padding,
state, decode=None)` for any number of new tokens (prefill, training, continuation) appended to `state`; with
`decode` (`h1rl.models.batch.DecodeColumns`) one token per row, written to each row's own buffer column and
attending to the columns its key mask allows: static shapes and no host synchronisation, which is what the rollout
engine's slots (rows of different lengths) and its CUDA graphs need. `allocate_inference_cache(batch_size,
max_seqlen, dtype)` makes the state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from h1rl.models.batch import DecodeColumns, Padding
from h1rl.models.cache import KVState
from h1rl.models.configuration import HybridConfig

HALF_DTYPES = (torch.float16, torch.bfloat16)  # the dtypes of the flash kernel


def attention_mask_for(
    key_valid: torch.Tensor | None,  # (B, S) bool: which cached/new keys are real tokens, or None (all)
    num_queries: int,  # T: the new tokens are the last T of the S keys
    num_keys: int,  # S
    sliding_window: int | None,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True where query i may attend key j: causal, real keys, inside the window."""
    past = num_keys - num_queries
    q_index = torch.arange(past, num_keys, device=device)[:, None]  # (T, 1) absolute index of each query
    k_index = torch.arange(num_keys, device=device)[None, :]  # (1, S)
    allowed = k_index <= q_index  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (q_index - k_index < sliding_window)
    allowed = allowed[None].expand(batch_size, -1, -1)  # (B, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
    allowed = allowed | (k_index == q_index)[None]  # a pad query attends to itself: keeps its row finite
    return allowed[:, None]  # (B, 1, T, S)


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, P) -> (B, Hkv * groups, S, P): query head h uses KV head h // groups."""
    B, Hkv, S, P = t.shape
    return t[:, :, None].expand(B, Hkv, groups, S, P).reshape(B, Hkv * groups, S, P)


def attend(
    q: torch.Tensor,  # (B, H, T, P)
    k: torch.Tensor,  # (B, Hkv, S, P)
    v: torch.Tensor,  # (B, Hkv, S, P)
    scale: float,
    mask: torch.Tensor | None = None,  # (B, 1, T, S) bool, causality included; None: causal (see `causal`)
    causal: bool = True,  # with no mask: query i (the (S - T + i)-th token) sees keys 0 .. S - T + i; else all keys
) -> torch.Tensor:
    """SDPA shaped for PyTorch's fused kernels (see the module docstring); returns (B, H, T, P)."""
    B, H, T, P = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    groups = H // Hkv
    if mask is None:
        bias, is_causal = None, False
        if causal and T > 1:
            is_causal = T == S
            bias = None if is_causal else causal_lower_right(T, S)  # a cached prefix precedes the new tokens
        gqa = groups > 1 and q.dtype in HALF_DTYPES  # flash takes grouped heads; the fp32 kernel needs them repeated
        if groups > 1 and not gqa:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if groups > 1 and T == 1:  # decode: the G query heads of a KV head become G queries of it; no KV copy
        out = scaled_dot_product_attention(q.reshape(B, Hkv, groups, P), k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, H, 1, P)  # (B, Hkv, G, P) -> (B, H, 1, P)
    if groups > 1:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Attention(nn.Module):
    """Grouped-query attention of one `"t"` layer."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.scaling = self.head_dim**-0.5
        qkv_bias = config.attention_bias or config.attention_qkv_bias
        D, H, Hkv, P = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * P, bias=qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * P, bias=qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * P, bias=qkv_bias)
        self.o_proj = nn.Linear(H * P, D, bias=config.attention_bias)
        if config.attention_qk_norm:
            self.q_norm = LlamaRMSNorm(P, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(P, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _qkv(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q (B, H, T, P), k and v (B, Hkv, T, P), RoPE applied to q and k."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, P)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, P)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, P), (B, Hkv, T, P)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, T, P)
        padding: Padding | None = None,  # real tokens among the S = cached + T positions; None: nothing padded
        state: KVState | None = None,
        decode: DecodeColumns | None = None,  # one token per row at per-row buffer columns (then T == 1)
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, position_embeddings)  # (B, H, T, P), (B, Hkv, T, P)
        if decode is not None:
            return self._decode(q, k, v, state, decode)
        if state is not None:
            k, v = state.append(k, v)  # (B, Hkv, S, P)
        S = k.shape[2]
        if padding is not None and padding.mask.shape[-1] != S:
            raise ValueError(
                f"layer {self.layer_idx}: attention_mask covers {padding.mask.shape[-1]} positions but the "
                f"layer sees {S} keys ({S - T} cached + {T} new); pass the mask of the whole sequence so far"
            )
        windowed = self.sliding_window is not None and S > self.sliding_window
        if (padding is None or padding.right_padded) and not windowed:
            out = attend(q, k, v, self.scaling)  # causal alone keeps every real query away from the pads
        else:
            key_valid = None if padding is None else padding.mask
            mask = attention_mask_for(key_valid, T, S, self.sliding_window, B, hidden_states.device)
            out = attend(q, k, v, self.scaling, mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)

    def _decode(self, q, k, v, state: KVState, decode: DecodeColumns) -> torch.Tensor:
        """q (n, H, 1, P), k and v (n, Hkv, 1, P): write each row's key/value at its column, attend its key mask."""
        n, S = decode.key_mask.shape
        rows = torch.arange(n, device=q.device)
        state.key[rows, :, decode.write] = k[:, :, 0].to(state.key.dtype)  # (n, Hkv, P) into (n, Hkv, S_buf, P)
        state.value[rows, :, decode.write] = v[:, :, 0].to(state.value.dtype)
        keys, values = state.key[:n, :, :S], state.value[:n, :, :S]  # (n, Hkv, S, P)
        out = attend(q, keys, values, self.scaling, mask=decode.key_mask[:, None, None, :])  # (n, H, 1, P)
        return self.o_proj(out.reshape(n, 1, -1))  # (n, 1, D)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> KVState:
        weight = self.k_proj.weight
        shape = (batch_size, self.num_kv_heads, max_seqlen, self.head_dim)
        dtype, device = dtype or weight.dtype, device or weight.device
        return KVState(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
