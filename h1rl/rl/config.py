"""The typed config of a GRPO run (`h1rl grpo --config FILE [key=value ...]`): what to train, on what, with what.

One YAML file maps one to one onto `GRPORunConfig` (through `h1rl.config_io`: unknown keys are errors naming the
dotted key). The optimisation and sampling knobs are TRL's own: the `trl` mapping is passed to `trl.GRPOConfig`
unchanged, so every field TRL documents works here and a misspelt one is refused by name. h1rl adds only what TRL
does not know: where the model and data come from, which built-in rewards to use with which weights, LoRA
targets that include the Mamba projections, dynamic sampling, three exact savings in the training forward
(skipping zero-advantage rows, prompt-prefix sharing, splitting rows by length), and the switch of the
sampler/trainer mismatch correction (TRL's importance sampling for vLLM rollouts, applied to the engine's: on by
default unless the policy runs in float32; its mode and caps are TRL's `trl.vllm_importance_sampling_mode`,
`trl.vllm_importance_sampling_clip_max` and `trl.vllm_importance_sampling_clip_min`; see docs/grpo.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The Mamba projections come first: a LoRA preset that forgets them leaves every m2 layer's mixer frozen.
DEFAULT_LORA_TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class DataConfig:
    """Where prompts (and reference answers) come from."""

    path: str  # a hub dataset name, or a local .json / .jsonl / .parquet file
    split: str = "train"
    prompt_column: str = "prompt"  # text, or a list of chat messages
    answer_column: str = "answer"  # passed to the rewards (the accuracy reward compares against it)
    system_prompt: str | None = None  # prepended as a system message when prompts are plain text
    chat: bool = True  # turn plain-text prompts into [system?, user] messages (TRL applies the chat template)
    max_samples: int | None = None  # keep only the first N rows (quick runs)


BUILTIN_REWARDS = ("accuracy", "format", "length")


@dataclass
class RewardSpec:
    """One reward function and its weight (see docs/rewards.md).

    `name`: a built-in (`accuracy`, `format`, `length`; `options` go to its factory) or your own function as
    `"package.module:function"`, following TRL's reward contract; with `options`, that function is a factory and
    is called with them to make the reward function.
    """

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in BUILTIN_REWARDS and ":" not in self.name:
            raise ValueError(f"name: {self.name!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor "
                             "an import path 'package.module:function'")


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class GRPORunConfig:
    model: str  # directory of an h1rl or Apriel-H1 checkpoint (a transformer teacher: convert it first)
    output_dir: str
    data: DataConfig
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy")])
    lora: LoraSpec | None = None
    # DAPO's dynamic sampling: replace prompt groups whose rewards all tie (zero advantage, zero gradient) with
    # fresh prompts, in at most this many extra generation rounds per batch; 0 turns it off
    dynamic_sampling_rounds: int = 0
    # train only on rows with a non-zero advantage where that leaves the gradient unchanged (see HybridGRPOTrainer)
    skip_zero_advantage_rows: bool = True
    # run each distinct prompt once in the training forward, its G rows continuing from its state (None: auto, on
    # on CPU, off on CUDA; see HybridGRPOTrainer)
    share_prompt_prefix: bool | None = None
    # split the training forward into at most this many groups of rows of similar length, each trimmed to its own
    # longest row (1: one forward, trimmed to the batch's longest row; see HybridGRPOTrainer)
    length_chunks: int = 4
    # correct the loss for the gap between the engine's sampling log-probs and the trainer's (TRL's truncated
    # importance sampling; None: auto, on unless the policy runs in float32; see HybridGRPOTrainer, docs/grpo.md)
    importance_sampling_correction: bool | None = None
    # the rollout engine's budget (h1rl.rollout.RolloutBudget): rows decoded at once (None: as many as the memory
    # budget holds), GiB for the decode cache, prefill and sampling (None: 90% of the free CUDA memory; no limit on
    # CPU), prompt tokens per row per prefill forward
    rollout_max_rows: int | None = None
    rollout_memory_gb: float | None = None
    rollout_prefill_chunk: int = 2048
    trl: dict[str, Any] = field(default_factory=dict)  # any trl.GRPOConfig field, e.g. learning_rate, beta

    def __post_init__(self):
        if not self.rewards:
            raise ValueError("rewards: at least one reward is needed")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: each reward may appear once, got {names}")
        for key, where in (("output_dir", "output_dir"), ("reward_weights", "rewards[].weight")):
            if key in self.trl:
                raise ValueError(f"trl.{key}: set it with the run config's {where}, not under trl")
