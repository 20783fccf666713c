"""Turning a teacher transformer into an h1rl hybrid (Mamba-in-Llama initialisation), and Apriel-H1 checkpoints.

Supported teachers (`SUPPORTED_TEACHERS`): Llama, Mistral, Qwen2 and Qwen3 causal LMs, loaded or in a local directory.

What `convert_teacher` does, layer by layer (`layout` has one code per teacher layer):

- every kept layer (`"t"` or `"m2"`): MLP (`gate/up/down_proj`, biases included) and both RMSNorms copied;
- `"t"`: the attention block copied whole (q/k/v/o projections, their biases, Qwen3's q/k norms); with the same
  config fields the hybrid reproduces the teacher's logits exactly (tested);
- `"m2"`: Mamba-in-Llama (MIL): `in_proj` rows `[z | x | B | C]` get `[fresh | v_proj | k_proj | q_proj]`,
  `out_proj` gets `o_proj`; `dt_in_proj`, `dt_proj`, `conv1d`, `A_log`, `D` and the z rows are freshly
  initialised (`MambaMixer.init_weights`: A = 1..N, D = 1, dt in [dt_min, dt_max]). MIL needs
  `d_inner = num_attention_heads * head_dim` and `d_xb = num_key_value_heads * head_dim`; the config sets them.
  Attention extras with no place in the mixer are dropped with a warning naming the layers: Qwen3's q/k norms
  always; q/k/v/o biases when `ssm_cfg.bias` is False (the Apriel-H1 default). With `ssm_cfg.bias=True` they are
  carried instead: `in_proj.bias` gets `[fresh | v_bias | k_bias | q_bias]`, `out_proj.bias` gets `o_bias` when
  the teacher has one.
- `"i"`: nothing; the teacher layer's weights are dropped.
- embeddings, final norm and `lm_head` copied (tied when the teacher ties them).

Every hybrid tensor (row by row for `in_proj`/`out_proj`) must end up either copied or deliberately initialised, and
every teacher tensor either used or deliberately dropped; `transfer_weights` checks both and returns the ledger as
a `ConversionReport`.

Apriel-H1 format: `save_apriel_checkpoint` writes the same weights under model_type `apriel_hybrid_ssm` (or
`apriel_ssm_thinker_hybrid`), loadable with `AutoModelForCausalLM.from_pretrained` after `import h1rl`.
`convert_to_directory` is the one-call version the CLI uses: teacher directory in, hybrid checkpoint out, tokenizer
files alongside.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from h1rl.models.configuration import (
    AprielHybridSSMConfig,
    AprielSSMThinkerHybridConfig,
    HybridConfig,
    SSMConfig,
)
from h1rl.models.modeling import AprielHybridSSMForCausalLM, AprielSSMThinkerHybridForCausalLM, HybridForCausalLM

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """How one teacher family maps onto `HybridConfig`."""

    architecture: str  # the transformers class the teacher must be an instance of
    attention_bias_field: bool  # config.attention_bias switches bias on q, k, v and o (Llama, Qwen3)
    qkv_bias: bool  # q, k, v always carry a bias, o never (Qwen2)
    qk_norm: bool  # per-head RMSNorm on queries and keys (Qwen3)
    mlp_bias_field: bool  # config.mlp_bias exists (Llama)
    sliding: str  # "all": config.sliding_window applies to every layer (Mistral); "layer_types": per layer (Qwen)


SUPPORTED_TEACHERS: dict[str, TeacherSpec] = {
    "llama": TeacherSpec("LlamaForCausalLM", True, False, False, True, "none"),
    "mistral": TeacherSpec("MistralForCausalLM", False, False, False, False, "all"),
    "qwen2": TeacherSpec("Qwen2ForCausalLM", False, True, False, False, "layer_types"),
    "qwen3": TeacherSpec("Qwen3ForCausalLM", True, False, True, False, "layer_types"),
}

APRIEL_CLASSES: dict[str, tuple[type[HybridConfig], type[HybridForCausalLM]]] = {
    AprielHybridSSMConfig.model_type: (AprielHybridSSMConfig, AprielHybridSSMForCausalLM),
    AprielSSMThinkerHybridConfig.model_type: (AprielSSMThinkerHybridConfig, AprielSSMThinkerHybridForCausalLM),
}

# Copied next to the converted weights when the teacher directory has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def teacher_spec(config: PretrainedConfig) -> TeacherSpec:
    """The `TeacherSpec` of a teacher config; ValueError naming the architecture if it is not supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TEACHERS:
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        supported = ", ".join(f"{k} ({v.architecture})" for k, v in SUPPORTED_TEACHERS.items())
        raise ValueError(
            f"teacher {'/'.join(archs)} (model_type {model_type!r}) is not supported for conversion; "
            f"supported teachers: {supported}"
        )
    return SUPPORTED_TEACHERS[model_type]


def parse_layout(layout: str | Sequence[str], num_layers: int) -> list[str]:
    """A list of layer codes, or a comma-separated string like "t,m2,m2,t", checked against the teacher's depth."""
    codes = [c.strip() for c in layout.split(",")] if isinstance(layout, str) else [str(c).strip() for c in layout]
    if len(codes) != num_layers:
        raise ValueError(
            f"layout has {len(codes)} entries but the teacher has {num_layers} layers (num_hidden_layers); "
            f"give one code per layer, e.g. {','.join(['t'] * num_layers)!r}"
        )
    return codes


def mil_ssm_cfg(teacher_config: PretrainedConfig, ssm_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """`ssm_cfg` with MIL's d_inner = heads * head_dim and d_xb = kv_heads * head_dim; d_state 16 unless given."""
    cfg = dict(ssm_cfg or {})
    head_dim = _head_dim(teacher_config)
    mil = {
        "d_inner": teacher_config.num_attention_heads * head_dim,
        "d_xb": teacher_config.num_key_value_heads * head_dim,
    }
    for key, value in mil.items():
        if cfg.get(key) is not None and cfg[key] != value:
            raise ValueError(
                f"ssm_cfg.{key}={cfg[key]} cannot be initialised from the teacher's attention: Mamba-in-Llama needs "
                f"{key}={value} (d_inner = num_attention_heads * head_dim = {teacher_config.num_attention_heads} * "
                f"{head_dim}, d_xb = num_key_value_heads * head_dim = {teacher_config.num_key_value_heads} * "
                f"{head_dim}); leave {key} out"
            )
    cfg.update(mil)
    try:
        resolved = SSMConfig.from_dict(cfg).resolved(teacher_config.hidden_size)
    except ValueError as err:
        raise ValueError(
            f"{err} (from the teacher: d_inner={mil['d_inner']}, d_xb={mil['d_xb']}; choose a d_state that divides "
            "d_xb, e.g. 16 or the teacher's head_dim)"
        ) from err
    return resolved.to_dict()


def hybrid_config_from_teacher(
    teacher_config: PretrainedConfig, layout: str | Sequence[str], ssm_cfg: dict[str, Any] | None = None
) -> HybridConfig:
    """A `HybridConfig` with the teacher's dimensions, RoPE, norms, biases and token ids, and the given layout."""
    spec = teacher_spec(teacher_config)
    c = teacher_config
    codes = parse_layout(layout, c.num_hidden_layers)
    kwargs: dict[str, Any] = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=_head_dim(c),
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters) if c.rope_parameters is not None else None,
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        sliding_window=None,
        hybrid_block_layout=codes,
        ssm_cfg=mil_ssm_cfg(c, ssm_cfg),
    )
    if spec.attention_bias_field:
        kwargs["attention_bias"] = bool(c.attention_bias)
    if spec.qkv_bias:
        kwargs["attention_qkv_bias"] = True
    if spec.qk_norm:
        kwargs["attention_qk_norm"] = True
    if spec.mlp_bias_field:
        kwargs["mlp_bias"] = bool(c.mlp_bias)
    if spec.sliding == "all":
        kwargs["sliding_window"] = c.sliding_window
    elif spec.sliding == "layer_types":
        # Qwen2/3 slide only in layers typed "sliding_attention" (use_sliding_window=True and i >= max_window_layers);
        # h1rl's sliding_window applies to every layer, so a per-layer mix cannot be reproduced.
        sliding = [i for i, kind in enumerate(c.layer_types or []) if kind == "sliding_attention"]
        if sliding:
            raise ValueError(
                f"teacher {spec.architecture} uses sliding-window attention in layer(s) {sliding} "
                f"(use_sliding_window={c.use_sliding_window}, max_window_layers={c.max_window_layers}); h1rl cannot "
                "reproduce per-layer sliding windows: convert a checkpoint with use_sliding_window=False"
            )
    return HybridConfig(**kwargs)


@dataclasses.dataclass
class ConversionReport:
    """Where every hybrid tensor came from. Keys are hybrid state-dict names, `name[a:b]` for a slice of rows."""

    copied: dict[str, str] = dataclasses.field(default_factory=dict)  # hybrid key -> teacher key
    initialised: list[str] = dataclasses.field(default_factory=list)  # hybrid keys freshly initialised
    dropped: list[str] = dataclasses.field(default_factory=list)  # teacher keys with no place in the hybrid


_SLICE = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def mil_rows(d_inner: int, d_xb: int) -> dict[str, tuple[int, int]]:
    """Mamba-in-Llama: which rows of the m2 `in_proj` ([z | x | B | C]) each attention projection initialises.

    >>> mil_rows(8, 4)
    {'v_proj': (8, 12), 'k_proj': (12, 16), 'q_proj': (16, 24)}
    """
    return {"v_proj": (d_inner, d_inner + d_xb), "k_proj": (d_inner + d_xb, d_inner + 2 * d_xb),
            "q_proj": (d_inner + 2 * d_xb, 2 * d_inner + 2 * d_xb)}


def transfer_weights(teacher: PreTrainedModel, hybrid: HybridForCausalLM) -> ConversionReport:
    """Copy the teacher's weights into `hybrid` (already initialised) as the module docstring says; in place.

    Raises if a hybrid tensor is neither copied nor initialised, or a teacher tensor neither used nor dropped.
    """
    spec = teacher_spec(teacher.config)
    teacher_cls = getattr(transformers, spec.architecture)
    if not isinstance(teacher, teacher_cls):
        raise TypeError(
            f"teacher must be a {spec.architecture} (model_type {teacher.config.model_type!r}), "
            f"got {type(teacher).__name__}"
        )
    src = teacher.state_dict()
    dst = hybrid.state_dict()
    report = ConversionReport()
    used: set[str] = set()
    cfg = hybrid.config

    def copy(dst_key: str, src_key: str, rows: tuple[int, int] | None = None) -> None:
        if src_key not in src:
            raise KeyError(f"teacher {spec.architecture} has no tensor {src_key!r} (needed for {dst_key!r})")
        if dst_key not in dst:
            raise KeyError(f"the hybrid has no tensor {dst_key!r} to receive teacher {spec.architecture}'s {src_key!r}")
        target = dst[dst_key] if rows is None else dst[dst_key][rows[0] : rows[1]]
        if target.shape != src[src_key].shape:
            raise ValueError(
                f"shape mismatch: teacher {src_key} {tuple(src[src_key].shape)} vs hybrid "
                f"{dst_key}{'' if rows is None else f'[{rows[0]}:{rows[1]}]'} {tuple(target.shape)}"
            )
        target.copy_(src[src_key])
        report.copied[dst_key if rows is None else f"{dst_key}[{rows[0]}:{rows[1]}]"] = src_key
        used.add(src_key)

    with torch.no_grad():
        copy("model.embed_tokens.weight", "model.embed_tokens.weight")
        copy("model.norm.weight", "model.norm.weight")
        tied_only = cfg.tie_word_embeddings and "lm_head.weight" not in src
        copy("lm_head.weight", "model.embed_tokens.weight" if tied_only else "lm_head.weight")
        dropped_extras: dict[str, list[int]] = {}
        ssm = cfg.ssm
        rows = mil_rows(ssm.d_inner, ssm.d_xb)
        for i, code in enumerate(cfg.hybrid_block_layout):
            prefix = f"model.layers.{i}."
            layer_keys = [key for key in src if key.startswith(prefix)]
            if code == "i":
                report.dropped.extend(layer_keys)
                continue
            for key in layer_keys:
                if key.startswith((prefix + "mlp.", prefix + "input_layernorm.", prefix + "post_attention_layernorm.")):
                    copy(key, key)
                elif code == "t" and key.startswith(prefix + "self_attn."):
                    copy(key, key)
            if code == "t":
                continue
            # "m2": Mamba-in-Llama. z rows, dt, conv, A and D keep their fresh initialisation.
            a, m = prefix + "self_attn.", prefix + "mixer."
            for proj, proj_rows in rows.items():
                copy(m + "in_proj.weight", a + proj + ".weight", proj_rows)
            copy(m + "out_proj.weight", a + "o_proj.weight")
            if ssm.bias:  # carry the attention biases; the z rows of in_proj.bias keep their fresh init
                for proj, proj_rows in rows.items():
                    if a + proj + ".bias" in src:
                        copy(m + "in_proj.bias", a + proj + ".bias", proj_rows)
                if a + "o_proj.bias" in src:
                    copy(m + "out_proj.bias", a + "o_proj.bias")
            for key in layer_keys:
                if key.startswith(a) and key not in used:
                    report.dropped.append(key)
                    dropped_extras.setdefault(key[len(a) :], []).append(i)
    for what, layers in dropped_extras.items():
        why = "no place in the m2 mixer" if "norm" in what else "ssm_cfg.bias is False"
        logger.warning("convert: dropped teacher attention %s of m2 layer(s) %s (%s)", what, layers, why)

    covered: dict[str, list[tuple[int, int]]] = {}
    for key in report.copied:
        name, rows = _split_slice(key, dst)
        covered.setdefault(name, []).append(rows)
    for name in dst:
        rows = covered.get(name, [])
        full = dst[name].shape[0] if dst[name].dim() else 1
        missing = _uncovered(rows, full)
        for start, stop in missing:
            report.initialised.append(name if (start, stop) == (0, full) else f"{name}[{start}:{stop}]")
    unexpected_init = [k for k in report.initialised if ".mixer." not in k]
    if unexpected_init:
        raise RuntimeError(f"convert: hybrid tensors neither copied nor MIL-initialised: {unexpected_init}")
    leftover = sorted(set(src) - used - set(report.dropped))
    if leftover:
        raise RuntimeError(f"convert: teacher {spec.architecture} tensors neither copied nor dropped: {leftover}")
    return report


def convert_teacher(
    teacher: PreTrainedModel | str | Path,
    layout: str | Sequence[str],
    ssm_cfg: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> HybridForCausalLM:
    """A `HybridForCausalLM` initialised from `teacher` (a loaded model or a local directory); see the module doc.

    `dtype`: of the hybrid (default: the teacher's). `seed`: seeds the fresh initialisation without touching the
    global RNG.
    """
    if isinstance(teacher, (str, Path)):
        teacher_spec(AutoConfig.from_pretrained(teacher))  # fail on an unsupported teacher before loading weights
        teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype if dtype is not None else "auto")
    config = hybrid_config_from_teacher(teacher.config, layout, ssm_cfg)
    dtype = dtype if dtype is not None else next(teacher.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        hybrid = HybridForCausalLM._from_config(config, dtype=dtype)
    report = transfer_weights(teacher, hybrid)
    logger.info(
        "convert: %d tensors/slices copied from %s, %d freshly initialised, %d teacher tensors dropped",
        len(report.copied),
        type(teacher).__name__,
        len(report.initialised),
        len(report.dropped),
    )
    return hybrid.train(teacher.training)


def save_apriel_checkpoint(
    model: HybridForCausalLM, out_dir: str | Path, model_type: str = "apriel_hybrid_ssm"
) -> Path:
    """Save `model` as an Apriel-H1 checkpoint (config model_type `model_type`, safetensors weights); no weight copy."""
    if model_type not in APRIEL_CLASSES:
        raise ValueError(
            f"model_type {model_type!r} is not an Apriel-H1 model type; use one of {sorted(APRIEL_CLASSES)}"
        )
    config_cls, model_cls = APRIEL_CLASSES[model_type]
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"):
        fields.pop(key, None)
    config = config_cls(**fields)
    with torch.device("meta"):
        target = model_cls(config)
    target.load_state_dict(model.state_dict(), strict=True, assign=True)
    target.tie_weights()
    target.generation_config = model.generation_config
    out = Path(out_dir)
    target.save_pretrained(out, safe_serialization=True)
    return out


def convert_to_directory(
    teacher_dir: str | Path,
    layout: str | Sequence[str],
    out_dir: str | Path,
    ssm_cfg: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> Path:
    """Convert the teacher in `teacher_dir`, save the hybrid to `out_dir` (safetensors) with the teacher's tokenizer.

    Tokenizer files, chat templates and generation_config.json (`TOKENIZER_FILES`) are copied when present.
    """
    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    if not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(f"teacher directory {teacher_dir} has no config.json")
    hybrid = convert_teacher(teacher_dir, layout, ssm_cfg=ssm_cfg, dtype=dtype, seed=seed)
    hybrid.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out / name)
    return out


# ---- helpers ----------------------------------------------------------------------------------------------------


def _head_dim(config: PretrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim is not None else config.hidden_size // config.num_attention_heads


def _split_slice(key: str, dst: dict[str, torch.Tensor]) -> tuple[str, tuple[int, int]]:
    match = _SLICE.match(key)
    if match:
        return match["name"], (int(match["start"]), int(match["stop"]))
    return key, (0, dst[key].shape[0] if dst[key].dim() else 1)


def _uncovered(rows: list[tuple[int, int]], full: int) -> list[tuple[int, int]]:
    """The row ranges of [0, full) not covered by `rows`."""
    gaps, pos = [], 0
    for start, stop in sorted(rows):
        if start > pos:
            gaps.append((pos, start))
        pos = max(pos, stop)
    if pos < full:
        gaps.append((pos, full))
    return gaps
