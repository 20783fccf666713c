"""The configuration of `h1rl grpo`, in TRL's shape: three dataclasses that TRL's `TrlParser` fills from a flat YAML
recipe plus `--flag value` overrides, as `trl grpo` and open-r1's `grpo.py` do (`h1rl.flags`):

- `GRPOScriptArguments`: the data (TRL's `dataset_name` / `dataset_config` / `dataset_train_split`, and h1rl's
  column mapping and system prompt) and the rewards (`reward_funcs` by name, their options in `reward_kwargs`; their
  weights are TRL's own `reward_weights`);
- `HybridGRPOConfig(GRPOConfig)`: all of TRL's GRPO and Trainer settings, plus h1rl's own: dynamic sampling, the
  exact savings of the training pass, the sampler/trainer mismatch switch and the rollout engine's memory budget.
  `HybridGRPOTrainer` reads them from its `args`;
- `HybridModelConfig(ModelConfig)`: TRL's model and PEFT settings (`model_name_or_path`, `dtype`, `use_peft`,
  `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`), with LoRA targets that include the Mamba
  projections by default: a preset that forgets `in_proj` / `out_proj` leaves every m2 mixer frozen.

    args = parse_grpo_args(["--config", "grpo_math", "--learning_rate", "1e-5", "--max_steps", "5"])
    args.script, args.training, args.model      # the three dataclasses
    args.recipe                                 # every key as parsed: saved as output_dir/resolved_config.yaml

`grpo_args_from_mapping(mapping)` does the same from a mapping (the demo's `grpo:` section). Both refuse an unknown
key before anything is loaded, naming the closest valid one (`h1rl grpo --help` lists them all).

Where h1rl's defaults differ from TRL's, for runs to work on CPU as written: `bf16` None means bf16 on CUDA and off
elsewhere (TRL: on unless fp16), `use_cpu` None means on when CUDA is absent, `dtype` None loads the model in bf16
when `bf16` is on and float32 otherwise (TRL: float32), and `deepspeed` also takes the bundled names `zero2`,
`zero3`, `zero3_offload` (`h1rl recipes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from trl import GRPOConfig, ModelConfig

from h1rl.config_io import ConfigError, closest, parse_yaml
from h1rl.flags import parse_flat

# The Mamba projections come first: a LoRA preset that forgets them leaves every m2 layer's mixer frozen.
DEFAULT_LORA_TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
BUILTIN_REWARDS = ("accuracy", "format", "length")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class GRPOScriptArguments:
    """The data and rewards of `h1rl grpo` (TRL's `ScriptArguments` names for the dataset)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Required. A hub dataset name, or a local .json / .jsonl / .parquet / .csv file (TRL's "
                          "ScriptArguments.dataset_name)."},
    )
    dataset_config: str | None = field(
        default=None,
        metadata={"help": "The hub dataset's configuration name (`name` of datasets.load_dataset); default none. "
                          "TRL's ScriptArguments.dataset_config."},
    )
    dataset_train_split: str = field(
        default="train",
        metadata={"help": "The split to train on (a local file has one: train); default train. TRL's "
                          "ScriptArguments.dataset_train_split."},
    )
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompt: text (turned into chat messages, see `chat`) or a list of chat "
                          "messages. Renamed to `prompt` for TRL. Default prompt. h1rl."},
    )
    answer_column: str = field(
        default="answer",
        metadata={"help": "Column handed to the rewards as the reference answer (the accuracy reward compares "
                          "against it), after `answer_format` extracted it. Default answer. h1rl."},
    )
    answer_format: str = field(
        default="auto",
        metadata={"help": "How the reference answer is read from `answer_column`: gsm8k (a solution ending '#### N'), "
                          "boxed (MATH: the last \\boxed{...}), plain (the answer itself), or auto (gsm8k if the text "
                          "has '####', else boxed if it has a \\boxed{}, else plain). Default auto. h1rl "
                          "(h1rl.data.loading).", "choices": ["auto", "gsm8k", "boxed", "plain"]},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "Prepended as a system message to plain-text prompts when `chat` is on; default none. "
                          "h1rl."},
    )
    chat: bool = field(
        default=True,
        metadata={"help": "Turn plain-text prompts into [system?, user] messages, so that TRL applies the "
                          "tokenizer's chat template; default true. h1rl."},
    )
    max_samples: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N rows (quick runs); default all. h1rl."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Reward functions by name: the built-ins `accuracy` (math-verify), `format`, `length` "
                          "(DAPO's overlong penalty; docs/rewards.md), or your own function by import path "
                          "(`package.module:function` or TRL's `package.module.function`) following TRL's reward "
                          "contract. Weights: TRL's `reward_weights`. Default: accuracy. As in TRL's grpo script."},
    )
    reward_kwargs: dict[str, dict[str, Any]] | str | None = field(
        default=None,
        metadata={"help": "Options per reward, by its name in `reward_funcs`: the keyword arguments of a built-in's "
                          "factory (e.g. {length: {max_length: 256, cache_length: 64}}), or of your function, which is "
                          "then a factory called with them. A mapping in YAML, JSON or YAML text on the command "
                          "line. Default none. h1rl."},
    )

    def __post_init__(self):
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = parse_yaml(self.reward_kwargs)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"reward_kwargs: not valid YAML or JSON: {err}") from err
        self.reward_kwargs = dict(self.reward_kwargs or {})
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.reward_funcs:
            raise ValueError("reward_funcs: give at least one reward, e.g. --reward_funcs accuracy")
        if len(set(self.reward_funcs)) != len(self.reward_funcs):
            raise ValueError(f"reward_funcs: each reward may appear once, got {self.reward_funcs}")
        for name in self.reward_funcs:
            if name not in BUILTIN_REWARDS and "." not in name and ":" not in name:
                raise ValueError(f"reward_funcs: {name!r}{closest(name, BUILTIN_REWARDS)} is neither a built-in reward "
                                 f"({', '.join(BUILTIN_REWARDS)}) nor an import path 'package.module:function'")
        for name, options in self.reward_kwargs.items():
            if name not in self.reward_funcs:
                raise ValueError(f"reward_kwargs: {name!r}{closest(name, self.reward_funcs)} is not one of "
                                 f"reward_funcs {self.reward_funcs}")
            if not isinstance(options, dict):
                raise ValueError(f"reward_kwargs.{name}: expected a mapping of keyword arguments, got {options!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples: must be >= 1 (or unset for all rows), got {self.max_samples}")


# h1rl's own fields of HybridGRPOConfig: what HybridGRPOTrainer reads from its `args` (keyword arguments of the same
# names override them, for a TRL GRPOConfig passed as `args`)
HYBRID_FIELDS = ("dynamic_sampling_rounds", "skip_zero_advantage_rows", "share_prompt_prefix", "length_chunks",
                 "importance_sampling_correction", "rollout_max_rows", "rollout_memory_gb", "rollout_prefill_chunk",
                 "partial_rollout_budget", "partial_rollout_extra_groups", "overlap_scoring")


@dataclass
class HybridGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig` plus h1rl's settings (each field's help says its meaning, default and source; docs/grpo.md).

    `__post_init__` checks h1rl's fields and their combinations with TRL's, with a message that says how to fix them,
    resolves `deepspeed`'s bundled names, sets up the process group of a multi-process CPU run before TRL's
    arguments touch the accelerate state (`h1rl.distributed.prepare_training_kwargs`), then runs TRL's checks.
    """

    dynamic_sampling_rounds: int = field(
        default=0,
        metadata={"help": "DAPO's dynamic sampling: replace prompt groups whose rewards all tie (zero advantage, no "
                          "gradient) with fresh prompts, in at most this many extra generation rounds per batch; 0 "
                          "(default) turns it off. h1rl (h1rl.rl.dynamic_sampling)."},
    )
    skip_zero_advantage_rows: bool = field(
        default=True,
        metadata={"help": "Leave rows with zero advantage out of the training pass where that leaves the gradient "
                          "unchanged (loss dapo/cispo/vespo, beta 0, no entropy terms); default true. h1rl "
                          "(h1rl.rl.row_skipping)."},
    )
    share_prompt_prefix: bool | None = field(
        default=None,
        metadata={"help": "Run each distinct prompt once in the training forward, its G rows continuing from its "
                          "state; exact. Default none: on on CPU, off on CUDA (the continuation's key mask costs more "
                          "memory than it saves there). h1rl (h1rl.rl.training_pass)."},
    )
    length_chunks: int = field(
        default=4,
        metadata={"help": "Split the training forward into at most this many groups of rows of similar length, each "
                          "trimmed to its longest row; exact. 1: one forward trimmed to the batch's longest row. "
                          "Default 4. h1rl (h1rl.rl.training_pass)."},
    )
    importance_sampling_correction: bool | None = field(
        default=None,
        metadata={"help": "Correct the loss for the gap between the engine's sampling log-probs and the trainer's "
                          "with TRL's truncated importance sampling (mode and caps: TRL's vllm_importance_sampling_*). "
                          "Default none: on unless the policy runs in float32. h1rl (h1rl.rl.importance)."},
    )
    rollout_max_rows: int | None = field(
        default=None,
        metadata={"help": "Rows the rollout engine decodes at once; default none: as many as the memory budget holds. "
                          "h1rl (h1rl.rollout.RolloutBudget.max_rows)."},
    )
    rollout_memory_gb: float | None = field(
        default=None,
        metadata={"help": "GiB for the rollout's decode cache, prefill and sampling, beside the weights; default none: "
                          "90%% of the free CUDA memory, no limit on CPU. h1rl (RolloutBudget.memory_gb)."},
    )
    rollout_prefill_chunk: int = field(
        default=2048,
        metadata={"help": "Prompt tokens per row per prefill forward of the rollout; default 2048. h1rl "
                          "(RolloutBudget.prefill_chunk)."},
    )
    partial_rollout_budget: int | None = field(
        default=None,
        metadata={"help": "Partial rollouts: decode steps per rollout round; prompt groups still running then are set "
                          "aside and continued in a later step (from their tokens, re-prefilled by the policy of that "
                          "step), the batch made of the groups that completed. Default none: off. Forces the "
                          "importance-sampling correction on. h1rl (h1rl.rl.partial_rollouts; Kimi k1.5, APRIL)."},
    )
    partial_rollout_extra_groups: int | None = field(
        default=None,
        metadata={"help": "Partial rollouts: prompt groups kept in flight beyond the batch (set-aside groups, topped "
                          "up with fresh prompts). Default none: a quarter of the batch's groups, at least 1. h1rl "
                          "(h1rl.rl.partial_rollouts)."},
    )
    overlap_scoring: bool = field(
        default=True,
        metadata={"help": "Start checking rollout rows with rewards that can prefetch (accuracy's math-verify) as "
                          "they finish, while the other rows still decode; the rewards are those of scoring after "
                          "the rollout. Default true. h1rl (HybridGRPOTrainer)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Default none: on when CUDA is available, off elsewhere (h1rl; TRL's "
                          "default is on unless fp16, which fails on a machine without a bf16 GPU)."},
    )
    use_cpu: bool | None = field(
        default=None,
        metadata={"help": "Train on the CPU. Default none: on when CUDA is not available (h1rl; transformers' "
                          "default is off)."},
    )

    def __post_init__(self):
        import torch

        from h1rl.distributed import deepspeed_config_path, prepare_training_kwargs

        check_hybrid_settings({name: getattr(self, name) for name in HYBRID_FIELDS})
        if self.use_vllm:
            raise ValueError("use_vllm: h1rl generates with its own engine; remove use_vllm (the sampler/trainer "
                             "correction TRL applies under vLLM is importance_sampling_correction here)")
        if self.use_transformers_paged or getattr(self, "use_transformers_continuous_batching", False):
            raise ValueError("use_transformers_paged / use_transformers_continuous_batching: h1rl generates with its "
                             "own engine (continuous batching included); remove them")
        if self.importance_sampling_correction and not self.vllm_importance_sampling_correction:
            raise ValueError("importance_sampling_correction=True contradicts vllm_importance_sampling_correction="
                             "False: set only importance_sampling_correction")
        cuda = torch.cuda.is_available()
        if self.bf16 is None:
            self.bf16 = cuda and not self.fp16
        if self.use_cpu is None:
            self.use_cpu = not cuda
        if isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{"):
            try:
                self.deepspeed = deepspeed_config_path(self.deepspeed)
            except FileNotFoundError as err:
                raise ValueError(str(err)) from err
        extra = prepare_training_kwargs(self.deepspeed)  # a multi-process CPU run: gloo, before TRL's device setup
        if extra:
            configured = self.accelerator_config
            if isinstance(configured, str):
                configured = parse_yaml(configured) if configured.lstrip().startswith("{") else configured
            if configured is None or isinstance(configured, dict):
                self.accelerator_config = {**(configured or {}), **extra["accelerator_config"]}
        super().__post_init__()
        check_whole_groups(self.dynamic_sampling_rounds, self.world_size,
                           self.per_device_train_batch_size * self.steps_per_generation, self.num_generations)


HYBRID_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HybridGRPOConfig) if f.name in HYBRID_FIELDS}


def check_hybrid_settings(settings: dict[str, Any]) -> None:
    """ValueError, saying how to fix it, for an out-of-range h1rl setting (HybridGRPOConfig's or the trainer's
    keyword overrides)."""
    if settings["dynamic_sampling_rounds"] < 0:
        raise ValueError(f"dynamic_sampling_rounds must be >= 0 (0 turns dynamic sampling off), got "
                         f"{settings['dynamic_sampling_rounds']}")
    if settings["length_chunks"] < 1:
        raise ValueError(f"length_chunks must be >= 1 (1: one training forward), got {settings['length_chunks']}")
    if settings["rollout_max_rows"] is not None and settings["rollout_max_rows"] < 1:
        raise ValueError(f"rollout_max_rows must be >= 1, or unset to size it by memory; got "
                         f"{settings['rollout_max_rows']}")
    if settings["rollout_memory_gb"] is not None and settings["rollout_memory_gb"] <= 0:
        raise ValueError(f"rollout_memory_gb must be > 0, or unset for 90% of the free CUDA memory; got "
                         f"{settings['rollout_memory_gb']}")
    if settings["rollout_prefill_chunk"] < 1:
        raise ValueError(f"rollout_prefill_chunk must be >= 1, got {settings['rollout_prefill_chunk']}")
    budget, extra = settings["partial_rollout_budget"], settings["partial_rollout_extra_groups"]
    if budget is not None and budget < 1:
        raise ValueError(f"partial_rollout_budget must be >= 1 decode step, or unset (partial rollouts off); got "
                         f"{budget}")
    if extra is not None and extra < 1:
        raise ValueError(f"partial_rollout_extra_groups must be >= 1 (or unset for a quarter of the batch); got "
                         f"{extra}")
    if budget is not None and settings["dynamic_sampling_rounds"]:
        raise ValueError("partial_rollout_budget and dynamic_sampling_rounds do not combine: both change which prompt "
                         "groups make the batch; set one of them")
    if budget is not None and settings["importance_sampling_correction"] is False:
        raise ValueError("partial_rollout_budget needs importance_sampling_correction: continued rows hold tokens of "
                         "older policies; unset importance_sampling_correction (it is then on)")


def check_whole_groups(dynamic_sampling_rounds: int, processes: int, local_rows: int, num_generations: int,
                       partial_rollouts: bool = False) -> None:
    """Dynamic sampling refills groups per process, and partial rollouts make batches of whole groups per process: so
    with several processes (always, with partial rollouts) each must hold whole groups."""
    what = "partial rollouts" if partial_rollouts else "dynamic sampling"
    if ((dynamic_sampling_rounds and processes > 1) or partial_rollouts) and local_rows % num_generations:
        raise ValueError(
            f"{what} with {processes} processes needs whole groups on each process: "
            f"per_device_train_batch_size x steps_per_generation ({local_rows}) must be a multiple of "
            f"num_generations ({num_generations}); change per_device_train_batch_size or num_generations"
        )


def hybrid_settings(args: GRPOConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """h1rl's settings for a trainer: from `args` when it is a HybridGRPOConfig (else HybridGRPOConfig's defaults),
    keyword `overrides` on top; checked."""
    settings = {name: getattr(args, name, HYBRID_DEFAULTS[name]) for name in HYBRID_FIELDS}
    unknown = set(overrides) - set(HYBRID_FIELDS)
    if unknown:
        raise TypeError(f"unknown h1rl setting(s) {sorted(unknown)}; HybridGRPOConfig has {', '.join(HYBRID_FIELDS)}")
    settings.update(overrides)
    check_hybrid_settings(settings)
    return settings


@dataclass
class HybridModelConfig(ModelConfig):
    """TRL's `ModelConfig` with h1rl's defaults: LoRA on the Mamba projections as well as attention's, and the model
    loaded in bf16 when training in bf16."""

    dtype: str | None = field(
        default=None,
        metadata={"help": "dtype the model is loaded in: auto, bfloat16, float16, float32. Default none: bfloat16 "
                          "when bf16 is on, else float32 (h1rl; TRL's default is float32).", "choices": list(DTYPES)},
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Modules LoRA adapts (with use_peft). Default: the m2 mixers' in_proj and out_proj and "
                          "attention's q/k/v/o_proj (h1rl; a preset that forgets the Mamba projections leaves every "
                          "m2 mixer frozen). TRL's ModelConfig.lora_target_modules."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.model_name_or_path is None:
            raise ValueError("model_name_or_path: required: an h1rl or Apriel-H1 checkpoint directory (convert a "
                             "transformer first: h1rl convert)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_in_4bit or self.load_in_8bit:
            raise ValueError("load_in_4bit / load_in_8bit: quantized hybrids are not supported by h1rl's rollout "
                             "engine; remove them")


DATACLASSES = (GRPOScriptArguments, HybridGRPOConfig, HybridModelConfig)
PROG = "h1rl grpo"
DESCRIPTION = ("GRPO on a hybrid from a recipe: `--config NAME|PATH` (a bundled recipe or a YAML file) plus "
               "`--key value` overrides of any key below (resumes from its last checkpoint)")


class GRPOArgs(NamedTuple):
    """A parsed GRPO run: its three dataclasses and the flat mapping of every key as parsed (`recipe`)."""

    script: GRPOScriptArguments
    training: HybridGRPOConfig
    model: HybridModelConfig
    recipe: dict[str, Any]


def parse_grpo_args(argv: list[str] | None = None) -> GRPOArgs:
    """`h1rl grpo`'s arguments: `--config NAME|PATH` plus `--key value` (ConfigError for an unknown key or a bad
    value; argparse exits on `--help` and on values it cannot parse)."""
    (script, training, model), recipe = parse_flat(DATACLASSES, argv or [], prog=PROG, description=DESCRIPTION,
                                                   kind="grpo")
    return GRPOArgs(script, training, model, _recorded(recipe))


def grpo_args_from_mapping(mapping: dict[str, Any], source: str = "<dict>") -> GRPOArgs:
    """The same from a flat mapping of keys (the demo's `grpo:` section)."""
    (script, training, model), recipe = parse_flat(DATACLASSES, [], prog=PROG, description=DESCRIPTION, kind="grpo",
                                                   mapping=mapping, source=source)
    return GRPOArgs(script, training, model, _recorded(recipe))


def grpo_keys() -> set[str]:
    """Every key a GRPO recipe may set."""
    return {f.name for cls in DATACLASSES for f in dataclasses.fields(cls) if f.init} | {"env"}


def check_grpo_keys(mapping: dict[str, Any], where: str) -> None:
    """ConfigError naming the first key of `mapping` that no GRPO dataclass has, and the closest one that exists."""
    keys = grpo_keys()
    for key in mapping:
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r}{closest(key, keys)}; `h1rl grpo --help` lists every key")


def _recorded(recipe: dict[str, Any]) -> dict[str, Any]:
    """What is saved as the run's resolved config: every key as parsed, without tokens (`hub_token`, ...)."""
    return {k: v for k, v in recipe.items() if not k.endswith("_token")}
