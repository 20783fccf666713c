"""Layer surgery on a hybrid student: swap attention layers to MIL-initialised m2 mixers, skip a layer for scoring.

- `swap_to_mamba(student, layers)`: a new `HybridForCausalLM` whose layout has the given `"t"` layers turned into
  `"m2"`; every other tensor is copied, layer indices stay as they are, and each new mixer is initialised by
  Mamba-in-Llama from that layer's *current* attention (V -> x, K -> B, Q -> C, O -> out_proj; z, dt, conv, A, D
  fresh), exactly the mapping `h1rl.models.convert.transfer_weights` applies to a teacher (a test checks that the two
  agree). `transfer_weights` only accepts a Llama/Mistral/Qwen teacher, not a hybrid, so the few lines of the
  mapping are applied here, to modules, by `mil_init_from_attention`.
- `skip_layer(model, i)`: a context in which layer i is an identity (`"i"`) block, for leave-one-out scoring
  without building a new model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence

import torch

from h1rl.models.attention import Attention
from h1rl.models.convert import mil_rows
from h1rl.models.mamba import MambaMixer
from h1rl.models.modeling import HybridForCausalLM, IdentityLayer

logger = logging.getLogger(__name__)

# Config keys that describe a saved checkpoint rather than the model; dropped when a config is rebuilt.
_NON_MODEL_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


def layout_of(model: HybridForCausalLM) -> list[str]:
    """The model's `hybrid_block_layout` (one code per layer)."""
    return list(model.config.hybrid_block_layout)


@torch.no_grad()
def mil_init_from_attention(attn: Attention, mixer: MambaMixer) -> None:
    """Mamba-in-Llama: copy `attn`'s projections into `mixer` in place (in_proj rows [z | x | B | C] get
    [kept | v_proj | k_proj | q_proj], out_proj gets o_proj; biases too when the mixer has them)."""
    for proj, (start, stop) in mil_rows(mixer.d_inner, mixer.d_xb).items():
        source = getattr(attn, proj)
        if source.weight.shape != mixer.in_proj.weight[start:stop].shape:
            raise ValueError(
                f"layer {mixer.layer_idx}: {proj} {tuple(source.weight.shape)} does not fit in_proj rows "
                f"{start}:{stop}; MIL needs d_inner = heads * head_dim and d_xb = kv_heads * head_dim"
            )
        mixer.in_proj.weight[start:stop].copy_(source.weight)
        if mixer.in_proj.bias is not None and source.bias is not None:
            mixer.in_proj.bias[start:stop].copy_(source.bias)
    mixer.out_proj.weight.copy_(attn.o_proj.weight)
    if mixer.out_proj.bias is not None and attn.o_proj.bias is not None:
        mixer.out_proj.bias.copy_(attn.o_proj.bias)


def swap_to_mamba(student: HybridForCausalLM, layers: Sequence[int], seed: int | None = None) -> HybridForCausalLM:
    """A new model with `layers` turned from `"t"` into MIL-initialised `"m2"`; `student` is left unchanged.

    `seed` seeds the fresh parts of the new mixers (z rows, dt, conv, A, D) without touching the global RNG.
    """
    config = student.config
    layout = layout_of(student)
    L = len(layout)
    for i in layers:
        if not 0 <= i < L:
            raise ValueError(f"swap: layer {i} is out of range: the model has {L} layers (0..{L - 1})")
        if layout[i] != "t":
            raise ValueError(f"swap: layer {i} is {layout[i]!r}, not an attention ('t') layer; layout {layout}")
    new_layout = ["m2" if i in set(layers) else code for i, code in enumerate(layout)]
    fields = config.to_dict()
    for key in _NON_MODEL_KEYS:
        fields.pop(key, None)
    fields["hybrid_block_layout"] = new_layout
    new_config = type(config)(**fields)
    param = next(student.parameters())
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        new = type(student)._from_config(new_config, dtype=param.dtype)
    new.to(param.device)
    src, dst = student.state_dict(), new.state_dict()
    swapped_prefixes = tuple(f"model.layers.{i}.mixer." for i in layers)
    with torch.no_grad():
        for key, tensor in dst.items():
            if key in src:
                tensor.copy_(src[key])
            elif not key.startswith(swapped_prefixes):
                raise RuntimeError(f"swap: tensor {key!r} of the new model has no source in the student")
    for i in layers:
        mil_init_from_attention(student.model.layers[i].self_attn, new.model.layers[i].mixer)
    dropped = [k for i in layers for k in src if k.startswith(f"model.layers.{i}.self_attn.") and "norm" in k]
    if dropped:
        logger.warning("swap: dropped attention q/k norms of layers %s (no place in the m2 mixer)", list(layers))
    new.generation_config = copy.deepcopy(student.generation_config)
    return new.train(student.training)


@contextlib.contextmanager
def skip_layer(model: HybridForCausalLM, i: int) -> Iterator[None]:
    """Within the block, layer `i` of `model` is an identity block (its mixer and MLP are skipped)."""
    layers = model.model.layers
    original = layers[i]
    layers[i] = IdentityLayer(model.config, i)
    try:
        yield
    finally:
        layers[i] = original
