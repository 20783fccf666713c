"""The attention mixer of `"t"` layers: grouped-query attention with RoPE, SDPA, and h1rl's KV cache.

Weight names are Mistral's (`q_proj`, `k_proj`, `v_proj`, `o_proj`) so teachers and Apriel-H1 checkpoints load
unchanged; Llama's all-projection bias, Qwen2's q/k/v bias and Qwen3's per-head q/k RMSNorm are config switches.
RoPE (every rope type transformers knows, Llama-3 scaling included) comes from transformers' rotary embedding.

The mask is built here rather than by transformers' masking utilities because it must combine three things the
rollout engine and the GRPO trainer rely on: causality over a (possibly preallocated) KV buffer, left padding
given as a 2D mask, and an optional sliding window. Query rows that see no valid key (pad positions) attend to
themselves, so their (ignored) outputs stay finite.

Mixer contract shared with `h1rl.models.mamba.MambaMixer`:
`forward(hidden_states, position_embeddings, attention_mask, state)` for any number of new tokens (prefill,
training, continuation), `step(...)` for one token, `allocate_inference_cache(batch_size, max_seqlen, dtype)`.
`step_static(...)` is `step` with static shapes (the whole preallocated buffer, a key mask, the write column as a
device tensor) for the CUDA-graph decoder of `h1rl.rollout.decode_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from h1rl.models.cache import KVState
from h1rl.models.configuration import HybridConfig


def attention_mask_for(
    key_valid: torch.Tensor | None,  # (B, S) bool: which cached/new keys are real tokens, or None (all)
    num_queries: int,  # T: the new tokens are the last T of the S keys
    num_keys: int,  # S
    sliding_window: int | None,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True where query i may attend key j; None when plain causal attention will do."""
    past = num_keys - num_queries
    if key_valid is None and sliding_window is None and (past == 0 or num_queries == 1):
        return None  # plain causal: SDPA's is_causal when T == S, no mask at all when T == 1
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
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 for real tokens, S = cached + T; None = no padding
        state: KVState | None = None,
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, position_embeddings)  # (B, H, T, P), (B, Hkv, T, P)
        if state is not None:
            k, v = state.append(k, v)  # (B, Hkv, S, P)
        S = k.shape[2]
        key_valid = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != S:
                raise ValueError(
                    f"layer {self.layer_idx}: attention_mask covers {attention_mask.shape[-1]} positions but the "
                    f"layer sees {S} keys ({S - T} cached + {T} new); pass the mask of the whole sequence so far"
                )
            key_valid = attention_mask.bool()  # the model passes None when nothing is padded
        mask = attention_mask_for(key_valid, T, S, self.sliding_window, B, hidden_states.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1 and T == S,
            scale=self.scaling,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, T, P)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def step(
        self,
        hidden_states: torch.Tensor,  # (B, D) one new token per row
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, 1, P)
        attention_mask: torch.Tensor | None,  # (B, S)
        state: KVState,
    ) -> torch.Tensor:
        return self.forward(hidden_states[:, None], position_embeddings, attention_mask, state)[:, 0]

    def step_static(
        self,
        hidden_states: torch.Tensor,  # (B, D) one new token per row
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, 1, P)
        key_mask: torch.Tensor,  # (B, S) bool over the whole buffer: True where a key is a real token
        state: KVState,  # buffers (B, Hkv, S, P); `state.length` is neither read nor updated
        write_index: torch.Tensor,  # (1,) long on the model's device: the buffer column of the new token
    ) -> torch.Tensor:
        """`step` with static shapes and no host synchronisation, for CUDA graph capture.

        The new key/value go to column `write_index` of the preallocated buffers (in place, same for every row),
        and the query attends over all S columns: those that `key_mask` marks real, at or before `write_index`
        (and inside the sliding window). Same result as `step` over the filled part of the buffer.
        """
        B, S = key_mask.shape
        q, k, v = self._qkv(hidden_states[:, None], position_embeddings)  # (B, H, 1, P), (B, Hkv, 1, P)
        state.key.index_copy_(2, write_index, k.to(state.key.dtype))
        state.value.index_copy_(2, write_index, v.to(state.value.dtype))
        k_index = torch.arange(S, device=key_mask.device)  # (S,)
        allowed = key_mask & (k_index <= write_index)  # (B, S)
        if self.sliding_window is not None:
            allowed = allowed & (write_index - k_index < self.sliding_window)
        out = F.scaled_dot_product_attention(
            q,
            state.key,
            state.value,
            attn_mask=allowed[:, None, None, :],  # (B, 1, 1, S)
            scale=self.scaling,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, 1, P)
        return self.o_proj(out.reshape(B, -1))

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> KVState:
        weight = self.k_proj.weight
        shape = (batch_size, self.num_kv_heads, max_seqlen, self.head_dim)
        dtype, device = dtype or weight.dtype, device or weight.device
        return KVState(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
