"""The typed config of a staged distillation run, and the static check of its schedule against the model.

`DistillConfig` is the single source of truth: the YAML recipe maps onto it one to one through
`h1rl.config_io.load_config` (unknown keys are errors naming the dotted key), and the run saves it, resolved, as
`output_dir/resolved_config.yaml`. A recipe holds the whole staged plan as data, e.g.:

    stages:
      - {scorer: loo, num_layers: 2, max_steps: 200}                       # the 2 least important by leave-one-out
      - {scorer: mmr, num_layers: 1, max_steps: 100, freeze_non_mamba: true}
      - {layers: [5, 7], max_steps: 100}                                   # an explicit list
      - {layers: [], max_steps: 100}                                       # distill only, no swap

`check_schedule` runs the plan against the starting layout before anything is trained, so a layer index out of
range, a layer that is not attention, or more swaps than attention layers fail at once with the stage named.
Layers named explicitly by a later stage are kept out of earlier scorers' candidates, so a scorer can never take a
layer that a later stage promises to swap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

SCORERS = ("loo", "mmr")
LOSS_KINDS = ("reverse_kl", "forward_kl")
DTYPES = ("float32", "bfloat16", "float16")

# TrainingArguments fields that h1rl sets itself per stage: a recipe may not set them through `trainer_args`.
RESERVED_TRAINER_ARGS = frozenset(
    {"output_dir", "max_steps", "num_train_epochs", "learning_rate", "save_strategy", "resume_from_checkpoint",
     "remove_unused_columns", "use_cpu"}
)


@dataclass
class ModelConfig:
    teacher: str  # directory or hub name of the teacher (Llama / Mistral / Qwen2 / Qwen3 causal LM), or `bundled`
    student: str | None = None  # optional starting hybrid checkpoint; default: the teacher converted, all "t"
    tokenizer: str | None = None  # default: the teacher's
    ssm_cfg: dict[str, Any] = field(default_factory=dict)  # m2 mixer settings (d_state, ...); MIL fixes d_inner/d_xb
    dtype: str = "float32"  # of teacher and student weights: float32, bfloat16, float16

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class DataConfig:
    """The distillation data, read by `h1rl.data.loading` (the loader of `h1rl grpo` and `h1rl eval` too), with the
    same names as there (TRL's where it has one)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "path": "dataset_name", "split": "dataset_train_split", "text_field": "dataset_text_field",
        "messages_field": "messages_column", "calibration_path": "calibration_dataset_name",
    }

    dataset_name: str  # local .jsonl/.json/.parquet/.csv file, a directory of them, or a hub dataset name
    dataset_config: str | None = None  # a hub dataset's configuration name (e.g. GSM8K's "main")
    dataset_train_split: str = "train"
    dataset_text_field: str = "text"  # rows with this column are plain text (TRL's SFTConfig name)
    messages_column: str = "messages"  # rows with this column are chat conversations (tokenizer's chat template)
    # rows of a question and its worked solution (e.g. GSM8K's question / answer) become the conversation
    # [system?, user: prompt_column, assistant: completion_column]; set both or neither
    prompt_column: str | None = None
    completion_column: str | None = None
    system_prompt: str | None = None  # the system message of conversations made from prompt / completion rows
    max_length: int = 1024  # tokens per sample; longer samples are truncated (never packed)
    assistant_only_loss: bool = False  # chat rows: loss on assistant tokens only ({% generation %} in the template)
    max_samples: int | None = None  # use the first N rows
    calibration_dataset_name: str | None = None  # data for importance scores and stage metrics; default: dataset_name
    calibration_samples: int = 64  # first N rows of the calibration data
    calibration_batch_size: int = 8

    def __post_init__(self):
        for name in ("max_length", "calibration_samples", "calibration_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if (self.prompt_column is None) != (self.completion_column is None):
            raise ValueError("prompt_column and completion_column: set both (rows of a prompt and its completion "
                             "become a conversation) or neither")


@dataclass
class LossConfig:
    kind: str = "reverse_kl"  # reverse_kl: KL(student || teacher) as Apriel-H1; forward_kl: KL(teacher || student)
    temperature: float = 1.0  # both distributions softened by T; the KL is multiplied by T^2
    ce_weight: float = 0.0  # + ce_weight * cross-entropy on the data's next tokens
    hidden_weight: float = 0.0  # + hidden_weight * MSE between student and teacher layer outputs
    hidden_layers: str = "mamba"  # which layer outputs to align: "mamba" (m2 layers) or "all"
    # The KD loss walks the sequence in chunks: logits exist for one chunk at a time (both models, float32). A chunk
    # holds as many positions as fit in `chunk_bytes` of float32 (rows, positions, vocab) temporaries (3 of them; 4
    # with ce_weight > 0 at temperature != 1), rows being training.per_device_train_batch_size on every process, so
    # that every process runs the same number of chunks (ZeRO-3). Default 1 GiB: 85 positions at 8 rows x 131072.
    chunk_bytes: int = 2**30
    chunk_size: int | None = None  # positions per chunk, overriding chunk_bytes (e.g. to test several chunks)

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(LOSS_KINDS)}, got {self.kind!r}")
        if self.hidden_layers not in ("mamba", "all"):
            raise ValueError(f"hidden_layers: expected 'mamba' or 'all', got {self.hidden_layers!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.ce_weight < 0 or self.hidden_weight < 0:
            raise ValueError(f"ce_weight and hidden_weight must be >= 0, got {self.ce_weight}, {self.hidden_weight}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: must be >= 1, got {self.chunk_bytes}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size: must be >= 1 (or unset: sized by chunk_bytes), got {self.chunk_size}")


@dataclass
class OnPolicyConfig:
    """Distillation on the student's own samples (GKD; `h1rl.distill.on_policy`). Needs chat rows with
    `data.assistant_only_loss` (the prompt is everything before the assistant turn)."""

    RENAMED: ClassVar[dict[str, str]] = {"max_new_tokens": "max_completion_length"}

    fraction: float = 0.0  # share of optimizer steps whose completions the student samples (GKD's lambda); 0: off
    max_completion_length: int = 256  # completion cap of the samples (rows are still cut at data.max_length)
    temperature: float = 1.0  # sampling temperature of the student

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction: must be in [0, 1], got {self.fraction}")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length: must be >= 1, got {self.max_completion_length}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")


@dataclass
class ImportanceConfig:
    metric: str = "kl"  # "kl": the distillation loss to the teacher; "lm_loss": cross-entropy on the data
    eval_fn: str | None = None  # "package.module:function", replaces the metric: fn(model, teacher, batches) -> float
    probe_steps: int = 100  # MMR: distillation steps of each probe (Apriel-H1: ~100)
    probe_learning_rate: float | None = None  # MMR: default the stage's learning rate

    def __post_init__(self):
        if self.metric not in ("kl", "lm_loss"):
            raise ValueError(f"metric: expected 'kl' or 'lm_loss', got {self.metric!r}")
        if self.eval_fn is not None and ":" not in self.eval_fn:
            raise ValueError(f"eval_fn: expected 'package.module:function', got {self.eval_fn!r}")
        if self.probe_steps < 1:
            raise ValueError(f"probe_steps: must be >= 1, got {self.probe_steps}")


@dataclass
class TrainingConfig:
    """The `transformers.TrainingArguments` of every stage (h1rl sets output_dir, max_steps and learning rate)."""

    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4  # default of every stage
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.0  # an int: steps; a float in [0, 1): ratio of the stage's steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500  # checkpoint-* every N steps within a stage (what an interrupted run resumes from)
    save_total_limit: int | None = 2
    bf16: bool = False
    activation_checkpointing: bool = False  # recompute layer activations in backward (saves memory)
    seed: int = 0
    deepspeed: str | None = None  # a DeepSpeed JSON file, or zero2 / zero3 / zero3_offload (bundled: h1rl recipes)
    report_to: str = "none"
    trainer_args: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments field, by name

    def __post_init__(self):
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        typed = {f.name for f in dataclasses.fields(self)}
        for key in self.trainer_args:
            if key in RESERVED_TRAINER_ARGS:
                raise ValueError(f"trainer_args.{key}: set by h1rl per stage (stages.N.max_steps / learning_rate)")
            if key in typed:
                raise ValueError(f"trainer_args.{key}: is a field of training itself; set training.{key}")
            if key not in known:
                raise ValueError(f"trainer_args.{key}: not a transformers.TrainingArguments field")


@dataclass
class StageConfig:
    max_steps: int  # distillation steps of this stage
    scorer: str | None = None  # "loo" or "mmr": pick `num_layers` attention layers by importance
    num_layers: int = 0  # how many layers the scorer swaps
    layers: list[int] | None = None  # or: exactly these layers ([] = distill only)
    learning_rate: float | None = None  # default training.learning_rate
    freeze_non_mamba: bool = False  # train only the m2 mixers (MambaInLlama's first stage)
    name: str | None = None  # for logs and the manifest

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.scorer is not None:
            if self.scorer not in SCORERS:
                raise ValueError(f"scorer: unknown scorer {self.scorer!r}; use one of {', '.join(SCORERS)}")
            if self.layers is not None:
                raise ValueError("give either scorer (+ num_layers) or layers, not both")
            if self.num_layers < 1:
                raise ValueError(f"num_layers: a {self.scorer} stage swaps at least 1 layer, got {self.num_layers}")
        elif self.layers is None:
            raise ValueError("give scorer (loo or mmr) + num_layers, or an explicit list of layers ([] = no swap)")
        elif self.num_layers:
            raise ValueError("num_layers is for scorer stages; an explicit stage swaps exactly `layers`")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: duplicates in {self.layers}")


@dataclass
class DistillConfig:
    RENAMED: ClassVar[dict[str, str]] = {"out_dir": "output_dir"}

    output_dir: str  # the run directory (resolved_config.yaml, importance/, stage_k/, manifest.json)
    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig]
    loss: LossConfig = field(default_factory=LossConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: give at least one stage")
        if self.on_policy.fraction > 0 and not self.data.assistant_only_loss:
            raise ValueError("on_policy.fraction > 0 needs data.assistant_only_loss: true (chat rows; the prompt is "
                             "what precedes the assistant turn)")


def check_schedule(stages: list[StageConfig], layout: list[str]) -> None:
    """Simulate the plan on `layout` (the starting student's); ValueError naming the stage at fault."""
    L = len(layout)
    attention = {i for i, code in enumerate(layout) if code == "t"}
    for k, stage in enumerate(stages):
        where = f"stage {k + 1} (stages.{k})"
        if stage.layers is not None:
            for i in stage.layers:
                if not 0 <= i < L:
                    raise ValueError(f"{where}: layer {i} is out of range: the model has {L} layers (0..{L - 1})")
                if i not in attention:
                    why = "swapped by an earlier stage" if layout[i] == "t" else f"{layout[i]!r} in the starting layout"
                    raise ValueError(f"{where}: layer {i} is not an attention layer any more ({why})")
            attention -= set(stage.layers)
        else:
            reserved = {i for later in stages[k + 1 :] if later.layers is not None for i in later.layers}
            candidates = attention - reserved
            if stage.num_layers > len(candidates):
                extra = f", {sorted(attention & reserved)} reserved by later stages" if attention & reserved else ""
                raise ValueError(
                    f"{where}: swaps {stage.num_layers} layers by {stage.scorer} but only {len(candidates)} "
                    f"attention layers are left to choose from ({sorted(candidates)}{extra}); the model has {L} layers"
                )
            attention -= set(sorted(candidates)[: stage.num_layers])  # which ones is decided at run time


def scorer_candidates(stages: list[StageConfig], k: int, layout: list[str]) -> list[int]:
    """The attention layers stage `k`'s scorer may choose from: not reserved by a later explicit stage."""
    reserved = {i for later in stages[k + 1 :] if later.layers is not None for i in later.layers}
    return [i for i, code in enumerate(layout) if code == "t" and i not in reserved]
