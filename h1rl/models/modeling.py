"""The hybrid language model: `HybridModel` and `HybridForCausalLM`, standard Hugging Face `PreTrainedModel`s.

Each decoder layer is pre-norm like Mistral's: `x + mixer(norm(x))` then `x + mlp(norm(x))`, where the mixer is
attention (`"t"`, kept under `self_attn` as in Mistral checkpoints) or the Mamba-in-Llama mixer (`"m2"`, under
`mixer` as in Apriel-H1 checkpoints); an `"i"` layer is skipped entirely. MLP and norms are transformers' Llama
modules, so their weight names and numerics are exactly a teacher's.

What the model adds to a plain transformers decoder, and why it is written here rather than reused:
- a hybrid cache (`h1rl.models.cache`) with constant-size Mamba state, used by `generate` through the
  `_supports_default_dynamic_cache() -> False` route that transformers keeps for stateful models;
- positions derived from the attention mask when none are given, so a left-padded row sees RoPE positions
  0, 1, ... exactly as it would alone, and the Mamba mixers keep pad tokens out of their state;
- `step()`-based one-token decoding for Mamba layers (the parallel scan is not needed for one token);
- `HybridModel.sharing_prefix(n)`: a forward over rows of which several share their first n tokens (GRPO's G
  completions of one prompt) runs those tokens once per distinct prefix and continues each row from its prefix's
  cached state, with gradients, instead of once per row (the GRPO trainer's training forward uses it).

`forward` accepts transformers' usual arguments (`input_ids`, `attention_mask`, `position_ids`, `cache` (alias
`past_key_values`), `inputs_embeds`, `labels`, `use_cache`, `logits_to_keep`, `output_hidden_states`), so the model
works under `Trainer`, TRL's `GRPOTrainer` and PEFT unmodified.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from h1rl.models.attention import Attention
from h1rl.models.batch import DecodeColumns, MaskLayout, Padding, decode_columns, leading_pads, left_align, restore
from h1rl.models.cache import HybridCache
from h1rl.models.configuration import AprielHybridSSMConfig, AprielSSMThinkerHybridConfig, HybridConfig
from h1rl.models.mamba import MambaMixer


class HybridDecoderLayer(GradientCheckpointingLayer):
    """One `"t"` or `"m2"` block: norm, mixer, residual; norm, MLP, residual."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.code = config.hybrid_block_layout[layer_idx]
        if self.code == "t":
            self.self_attn = Attention(config, layer_idx)
        else:
            self.mixer = MambaMixer(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def token_mixer(self) -> Attention | MambaMixer:
        return self.self_attn if self.code == "t" else self.mixer

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding: Padding | None = None,
        cache: HybridCache | None = None,
        decode: DecodeColumns | None = None,
    ) -> torch.Tensor:
        state = None if cache is None else cache[self.layer_idx]
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        if self.code == "t":
            h = self.self_attn(h, position_embeddings, padding, state, decode)
        else:
            empty = cache is not None and cache.seen_tokens == 0
            h = self.mixer(h, position_embeddings, padding, state, decode, state_is_empty=empty)
        hidden_states = residual + h
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class IdentityLayer(nn.Module):
    """An `"i"` block: the layer is skipped (no mixer, no MLP), as in Apriel-H1."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.code = "i"

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # the Mamba state cannot be cropped: no assisted decoding

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MambaMixer):
            module.init_weights()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridCache

    def allocate_cache(
        self, batch_size: int, max_length: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> HybridCache:
        """An empty decode cache for `batch_size` rows; attention buffers hold `max_length` tokens (and grow)."""
        base = self.model if hasattr(self, "model") else self
        layers = [
            None
            if layer.code == "i"
            else layer.token_mixer.allocate_inference_cache(batch_size, max_length, dtype, device)
            for layer in base.layers
        ]
        return HybridCache(layers)


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [
                IdentityLayer(config, i) if code == "i" else HybridDecoderLayer(config, i)
                for i, code in enumerate(config.hybrid_block_layout)
            ]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.shared_prefix_length: int | None = None  # set by `sharing_prefix`
        self.post_init()

    @contextmanager
    def sharing_prefix(self, length: int) -> Iterator[None]:
        """Within the block, a forward over full sequences (no cache) computes the first `length` positions once per
        group of rows (anywhere in the batch) whose first `length` token ids and mask columns are equal, and continues
        every row from its group's cached state: the same hidden states as the plain forward (up to float rounding),
        and the same gradients, for the prefix's compute divided by the group size.

        The two-phase forward (prefix, then continuation: every layer called twice) runs whatever the rows hold, even
        when every prefix is distinct (groups of one), so that the sequence of layer calls depends on the settings
        only, never on the data: under DeepSpeed ZeRO-3 every process gathers each layer's parameters in step with
        the others. It falls back to the plain forward, on every process alike, when hidden states of every layer
        are asked for, or under gradient checkpointing in training mode (its recomputation would append to the cache
        twice).
        """
        if length < 1:
            raise ValueError(f"sharing_prefix: length must be >= 1, got {length}")
        self.shared_prefix_length = length
        try:
            yield
        finally:
            self.shared_prefix_length = None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: HybridCache | None = None,
        decode: DecodeColumns | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """transformers' usual arguments; `decode`: one token per row, each written at its own KV column and reading
        the columns its key mask allows (`h1rl.rollout.decode_step.StaticDecoder`; pass `position_ids`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"cache must be an h1rl HybridCache, got {type(cache).__name__}")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = self.allocate_cache(B, T, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        past = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2D (batch, sequence), got {tuple(attention_mask.shape)}")
            if attention_mask.shape[1] != past + T:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns; expected {past + T} "
                    f"({past} cached tokens + {T} new ones)"
                )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]
        position_ids = position_ids.expand(B, -1)
        shared = self.shared_prefix_length
        if (shared is not None and cache is None and input_ids is not None and 0 < shared < T
                and not output_hidden_states and not (self.gradient_checkpointing and self.training)):
            hidden_states = self._forward_sharing_prefix(input_ids, inputs_embeds, attention_mask, position_ids, shared)
            return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))

        padding, shift = batch_padding(attention_mask, cacheless=cache is None)
        if shift is not None:  # left-padded rows without a cache: run them left-aligned (see h1rl.models.batch)
            inputs_embeds, position_ids = left_align(inputs_embeds, shift), left_align(position_ids, shift)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: (B, T, P)
        if decode is None and cache is not None and past > 0 and T == 1:  # generate: every row writes column `past`
            cache.ensure_capacity(past + 1)
            valid = None if padding is None else padding.mask
            decode = decode_columns(inputs_embeds.new_full((B,), past, dtype=torch.long), past + 1,
                                    self.config.sliding_window, valid)
        all_hidden_states = [] if output_hidden_states else None
        hidden_states = self._run_layers(inputs_embeds, position_embeddings, padding, cache, decode,
                                         all_hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        if shift is not None:
            hidden_states = restore(hidden_states, shift)
            all_hidden_states = None if all_hidden_states is None else [restore(h, shift) for h in all_hidden_states]
        if cache is not None:
            cache.set_length(past + T)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )

    def _run_layers(self, hidden_states, position_embeddings, padding, cache, decode=None,
                    all_hidden_states=None) -> torch.Tensor:
        """The decoder layers over hidden states (B, T, D); `all_hidden_states` collects each layer's input."""
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, padding=padding,
                                  cache=cache, decode=decode)
        return hidden_states

    def _forward_sharing_prefix(
        self,
        input_ids: torch.Tensor,  # (B, T)
        inputs_embeds: torch.Tensor,  # (B, T, D)
        attention_mask: torch.Tensor | None,  # (B, T)
        position_ids: torch.Tensor,  # (B, T)
        length: int,  # L: the shared prefix
    ) -> torch.Tensor:
        """Decoder layers (before the final norm) with the first `length` positions run once per group of rows that
        share them (see `sharing_prefix`)."""
        prefix_mask = None if attention_mask is None else attention_mask[:, :length]
        first, group = prefix_groups(input_ids[:, :length], prefix_mask)  # (U,), (B,)
        U = first.numel()
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)  # (B, T, P)
        cache = self.allocate_cache(U, length, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        padding, _ = batch_padding(None if prefix_mask is None else prefix_mask[first], cacheless=False)
        prefix = self._run_layers(
            inputs_embeds[first, :length], (cos[first, :length], sin[first, :length]), padding, cache
        )  # (U, L, D)
        cache.set_length(length)
        rows = cache.index_select(group)  # every row continues from its group's state (differentiable)
        padding, _ = batch_padding(attention_mask, cacheless=False)
        rest = self._run_layers(
            inputs_embeds[:, length:], (cos[:, length:], sin[:, length:]), padding, rows
        )  # (B, T - L, D)
        return torch.cat([prefix.index_select(0, group), rest], dim=1)  # (B, T, D)


def batch_padding(attention_mask: torch.Tensor | None, cacheless: bool) -> tuple[Padding | None, torch.Tensor | None]:
    """How the layers see a batch's padding (one host read of the mask): (padding, None), or (None, shift) when a
    cacheless forward of rows that are pads, tokens, pads runs left-aligned (see `h1rl.models.batch`)."""
    if attention_mask is None:
        return None, None
    layout = MaskLayout.of(attention_mask)
    if layout.all_real:
        return None, None
    if layout.right_padded:
        return Padding(attention_mask.bool(), right_padded=True), None
    if cacheless and layout.contiguous:  # nothing keeps state out of this forward: the trailing pads are harmless
        return None, leading_pads(attention_mask)
    return Padding(attention_mask.bool(), right_padded=False), None


def prefix_groups(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with equal `ids` (B, L) and `mask` columns, wherever they are in the batch (TRL shuffles its rows): one
    row of each distinct prefix (U,), and the group of each row (B,); groups of one when every prefix is distinct."""
    key = ids if mask is None else torch.cat([ids, mask.to(ids.dtype)], dim=1)  # (B, L) or (B, 2L)
    distinct, group = torch.unique(key, dim=0, return_inverse=True)  # (U, .), (B,)
    first = torch.full((distinct.shape[0],), key.shape[0], dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, group, torch.arange(key.shape[0], device=ids.device), reduce="amin")
    return first, group


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        past_key_values: HybridCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T_kept, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


class AprielHybridSSMForCausalLM(HybridForCausalLM):
    """`HybridForCausalLM` for checkpoints of model type `apriel_hybrid_ssm` (saves back in that format)."""

    config_class = AprielHybridSSMConfig
    config: AprielHybridSSMConfig


class AprielSSMThinkerHybridForCausalLM(HybridForCausalLM):
    """`HybridForCausalLM` for checkpoints of model type `apriel_ssm_thinker_hybrid`."""

    config_class = AprielSSMThinkerHybridConfig
    config: AprielSSMThinkerHybridConfig
