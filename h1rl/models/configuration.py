"""Configuration of h1rl hybrid models: one `HybridConfig`, compatible with Apriel-H1 checkpoints.

A hybrid config is a Mistral config plus two fields, exactly as in ServiceNow's Apriel-H1 checkpoints:

- `hybrid_block_layout`: one code per decoder layer. `"t"` is an attention (Mistral/Llama/Qwen) block, `"m2"` the
  Mamba-in-Llama mixer of `h1rl.models.mamba`, `"i"` an identity block (the layer is skipped entirely).
- `ssm_cfg`: the settings of the `"m2"` mixers (see `SSMConfig` for every key, its meaning and default).

Three optional fields let attention blocks reproduce teachers other than Mistral exactly: `attention_bias`
(Llama: bias on q, k, v and o), `attention_qkv_bias` (Qwen2: bias on q, k, v only), `attention_qk_norm` (Qwen3:
RMSNorm on each query and key head), plus Llama's `mlp_bias`. They default to off, as in Apriel-H1.

`HybridConfig` has model_type `h1rl_hybrid`. Two aliases carry the model types found in published Apriel-H1
checkpoints (`apriel_hybrid_ssm`, `apriel_ssm_thinker_hybrid`) so that such a checkpoint loads through
`AutoModelForCausalLM.from_pretrained` without `trust_remote_code` and saves back in its own format.
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig

LAYER_CODES = {"t": "attention", "m2": "Mamba-in-Llama mixer", "i": "identity"}

# Keys that Apriel-H1 checkpoints carry for the discrete Mamba-2 ("m2d") mixer; the m2 mixer does not use them.
IGNORED_SSM_KEYS = frozenset({"n_qk_heads", "n_v_heads", "chunk_size", "activation_fn", "ngroups", "headdim"})


@dataclasses.dataclass(frozen=True)
class SSMConfig:
    """Settings of the `"m2"` mixer, as the `ssm_cfg` of an Apriel-H1 checkpoint spells them.

    `None` for `d_inner`, `d_xb` or `dt_rank` means what it means in the reference implementation:
    `expand * hidden_size`, `hidden_size`, and `ceil(hidden_size / 16)`. Conversion from a teacher sets
    `d_inner = num_attention_heads * head_dim` and `d_xb = num_key_value_heads * head_dim` (Mamba-in-Llama).
    """

    d_state: int = 16  # N: state size per channel; also the channels per head (P) and per x/B group
    d_conv: int = 4  # kernel width of the depthwise causal convolution
    expand: int = 1  # d_inner = expand * hidden_size when d_inner is None
    d_inner: int | None = None  # channels of x after the grouped repeat (like attention's q dim)
    d_xb: int | None = None  # channels of x and B before the repeat (like attention's k/v dim)
    dt_rank: int | str | None = None  # rank of the low-rank dt projection; "auto" or None = ceil(hidden / 16)
    dt_min: float = 0.001  # range of the initial step sizes (dt_proj bias init)
    dt_max: float = 0.1
    dt_init: str = "random"  # "random" (uniform) or "constant" init of dt_proj.weight
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    activation: str = "silu"  # after the convolution; the reference supports silu only
    bias: bool = False  # bias of in_proj, dt_in_proj and out_proj
    conv_bias: bool = True
    dt_proj_bias: bool = True
    repeat_kv_before_conv: bool = True  # the reference's only mode

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> SSMConfig:
        cfg = dict(cfg or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known - IGNORED_SSM_KEYS)
        if unknown:
            raise ValueError(f"ssm_cfg: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def resolved(self, hidden_size: int) -> SSMConfig:
        """The same settings with `d_inner`, `d_xb` and `dt_rank` made explicit, validated."""
        d_inner = self.d_inner if self.d_inner is not None else self.expand * hidden_size
        d_xb = self.d_xb if self.d_xb is not None else hidden_size
        dt_rank = math.ceil(hidden_size / 16) if self.dt_rank in (None, "auto") else self.dt_rank
        out = dataclasses.replace(self, d_inner=d_inner, d_xb=d_xb, dt_rank=dt_rank)
        out.validate()
        return out

    def validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"ssm_cfg.{field}: {why}")

        for name in ("d_state", "d_conv", "d_inner", "d_xb", "dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.d_inner % self.d_state:
            fail("d_inner", f"{self.d_inner} is not divisible by d_state={self.d_state}")
        if self.d_xb % self.d_state:
            fail("d_xb", f"{self.d_xb} is not divisible by d_state={self.d_state}")
        if self.d_inner % self.d_xb:
            fail("d_inner", f"{self.d_inner} is not divisible by d_xb={self.d_xb} (x and B repeat d_inner/d_xb times)")
        if self.activation not in ("silu", "swish"):
            fail("activation", f"only 'silu' is supported, got {self.activation!r}")
        if not self.repeat_kv_before_conv:
            fail("repeat_kv_before_conv", "only True is supported (the Apriel-H1 reference's only mode)")
        if self.dt_init not in ("random", "constant"):
            fail("dt_init", f"must be 'random' or 'constant', got {self.dt_init!r}")
        if not 0 < self.dt_min <= self.dt_max:
            fail("dt_min", f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@strict
class HybridConfig(MistralConfig):
    r"""A Mistral config plus `hybrid_block_layout` and `ssm_cfg` (see the module docstring).

    Example:
    ```python
    >>> from h1rl.models import HybridConfig
    >>> cfg = HybridConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    ...                    num_key_value_heads=2, vocab_size=100, hybrid_block_layout=["t", "m2", "i"])
    >>> cfg.ssm_cfg["d_inner"], cfg.ssm_cfg["dt_rank"]
    (64, 4)
    ```
    """

    model_type = "h1rl_hybrid"
    # No remote code: h1rl registers its classes with the Auto classes on import. Loaders that look up
    # `config.auto_map` for an architecture transformers does not know (TRL's reference model, beta > 0) read this
    # empty map and fall back to AutoModelForCausalLM; a checkpoint's own auto_map (Apriel-H1's) overrides it.
    auto_map = MappingProxyType({})

    hybrid_block_layout: list[str] | None = None
    ssm_cfg: dict | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    attention_qkv_bias: bool = False
    attention_qk_norm: bool = False
    mlp_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hybrid_block_layout is None:
            self.hybrid_block_layout = ["t"] * self.num_hidden_layers
        self.hybrid_block_layout = list(self.hybrid_block_layout)
        self.validate_layout()
        self.ssm_cfg = SSMConfig.from_dict(self.ssm_cfg).resolved(self.hidden_size).to_dict()

    def validate_layout(self) -> None:
        layout = self.hybrid_block_layout
        if len(layout) != self.num_hidden_layers:
            raise ValueError(
                f"hybrid_block_layout has {len(layout)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, code in enumerate(layout):
            if code not in LAYER_CODES:
                extra = " (discrete Mamba-2 is not supported by h1rl)" if code == "m2d" else ""
                raise ValueError(
                    f"hybrid_block_layout[{i}]: unknown layer code {code!r}{extra}; "
                    f"supported codes: {', '.join(f'{k!r} ({v})' for k, v in LAYER_CODES.items())}"
                )

    @property
    def ssm(self) -> SSMConfig:
        """`ssm_cfg` as a typed, resolved `SSMConfig`."""
        return SSMConfig.from_dict(self.ssm_cfg)


@strict
class AprielHybridSSMConfig(HybridConfig):
    """`HybridConfig` under the model type of newer Apriel-H1 checkpoints."""

    model_type = "apriel_hybrid_ssm"


@strict
class AprielSSMThinkerHybridConfig(HybridConfig):
    """`HybridConfig` under the model type of older Apriel-H1 checkpoints."""

    model_type = "apriel_ssm_thinker_hybrid"
