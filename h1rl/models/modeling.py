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
- `step()`-based one-token decoding for Mamba layers (the parallel scan is not needed for one token).

`forward` accepts transformers' usual arguments (`input_ids`, `attention_mask`, `position_ids`, `cache` (alias
`past_key_values`), `inputs_embeds`, `labels`, `use_cache`, `logits_to_keep`, `output_hidden_states`), so the model
works under `Trainer`, TRL's `GRPOTrainer` and PEFT unmodified.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from h1rl.models.attention import Attention
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
        attention_mask: torch.Tensor | None = None,  # (B, S)
        cache: HybridCache | None = None,
        decode_step: bool = False,
    ) -> torch.Tensor:
        state = None if cache is None else cache[self.layer_idx]
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        if decode_step:
            h = self.token_mixer.step(h[:, 0], position_embeddings, attention_mask, state)[:, None]
        else:
            h = self.token_mixer(h, position_embeddings, attention_mask, state)
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
        self.post_init()

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
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
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
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, -1)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: (B, T, P)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: checked once here, not in every layer
        decode_step = cache is not None and past > 0 and T == 1

        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                decode_step=decode_step,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.seen_tokens = past + T
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


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
