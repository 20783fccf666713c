"""`DistillTrainer`: transformers' `Trainer` with a distillation loss against a frozen teacher; shared forward passes.

Only `compute_loss`, `log` (to report the loss parts) and, for on-policy distillation, `get_batch_samples` (the
student samples the completions of the step's batches before the Trainer counts their target tokens; see
`h1rl.distill.on_policy`) are overridden, so accelerate, DeepSpeed, PEFT, gradient checkpointing, logging callbacks,
checkpointing and resuming are the Trainer's own. The teacher is held as an
attribute, frozen (`requires_grad=False`) and in eval mode, on the Trainer's device; under DeepSpeed it is wrapped
for inference with TRL's `prepare_deepspeed` (sharded under ZeRO-3), since the Trainer only prepares the student.

Both models are called through their (possibly wrapped) forward with `logits_to_keep=1` and no per-layer states
(`hidden_states`): forward hooks keep the final normed hidden states, which feed the chunked loss of
`h1rl.distill.losses` (no full `(B, T, V)` logits are made), and, only when `loss.hidden_weight > 0`, the outputs of
the layers `loss.hidden_layers` selects. At the Apriel-H1-15B shape and 8 x 8k tokens, every layer's states of the
teacher would be 51 x 640 MiB = 32 GiB. The chunks are sized for the configured per-device batch size, so that every
process runs as many of them as the others (ZeRO-3). The returned loss is the micro-batch's part of the mean over
the whole step's target tokens (all accumulation steps, all processes: the Trainer's `num_items_in_batch`).

Also here: `hidden_states` (the one forward used by the trainer, the scorers and the stage metrics),
`evaluate_metric` (KL or LM loss of a model on calibration batches), `set_trainable` and `training_arguments`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from h1rl.distill.config import LossConfig, OnPolicyConfig, TrainingConfig
from h1rl.distill.losses import distill_loss, hidden_alignment
from h1rl.distill.on_policy import is_on_policy_step, sampling_seed, student_batch
from h1rl.distributed import deepspeed_config_path, prepare_training_kwargs
from h1rl.eval import stop_token_ids
from h1rl.rollout.engine import find_hybrid
from h1rl.rollout.sampling import SamplingParams


def right_padded(batch: dict[str, torch.Tensor]) -> bool:
    """Whether every row of `batch` is real tokens then pads (one host read of the mask)."""
    mask = batch.get("attention_mask")
    return mask is None or not bool((mask[:, 1:] > mask[:, :-1]).any())


def hidden_states(
    model: nn.Module, batch: dict[str, torch.Tensor], layers: Sequence[int] = (), is_right_padded: bool | None = None
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The final (normed) hidden states (B, T, D) of a causal LM, and the outputs {i: (B, T, D)} of `layers` only.

    The model is called through its wrappers (DeepSpeed, DDP, PEFT: their forward does work of its own) with one
    position's logits and `output_hidden_states=False`, so it runs the same modules in the same order as any forward
    (ZeRO-3) and keeps no per-layer states. Forward hooks on its decoder (`get_decoder()`, any transformers causal
    LM) keep what is asked for: the decoder's `last_hidden_state`, and layer i's output as the input of layer i + 1
    (the tensor the model passes on, with its gradient, also under activation checkpointing); the last layer's
    output is the final normed state, as in transformers' `hidden_states[-1]`. The hooks are removed before backward.
    Layer outputs are read as the decoder passes them on, so a batch with `layers` must be right-padded (the
    distillation collator's layout): a model may lay left-padded rows out differently inside. Right-padded rows are
    run without an attention mask (`is_right_padded`; None: read from the mask): causality keeps every real token
    away from the pads after it and the pads carry no target, and without a mask a transformers teacher runs its
    flash kernel, where with one it builds a (B, 1, T, T) mask, repeats its KV heads and runs the memory-efficient
    kernel with a bf16 bias (at 8 x 8k: 0.5 GiB of mask, 1 GiB of bias and 1 GiB of repeated KV per layer).
    """
    decoder = _unwrap(model).get_decoder()
    blocks = _decoder_layers(model) if layers else []
    if is_right_padded is None:
        is_right_padded = right_padded(batch)
    if layers and not is_right_padded:
        raise ValueError("hidden-state alignment needs right-padded rows (real tokens, then pads); the batch has a pad "
                         "before a real token")
    mask = None if is_right_padded else batch.get("attention_mask")
    kept: dict[Any, torch.Tensor] = {}

    def keep(key: Any, tensor: torch.Tensor) -> None:
        if key in kept:
            where = "the decoder" if key == "final" else f"layer {key + 1}"
            raise RuntimeError(f"{where} ran twice in one forward; hidden_states keeps one output per layer")
        kept[key] = tensor

    handles = [decoder.register_forward_hook(lambda module, args, out: keep("final", out[0]))]
    for i in layers:
        if not 0 <= i < len(blocks):
            raise ValueError(f"layer {i} is out of range: {type(_unwrap(model)).__name__} has {len(blocks)} layers")
        if i + 1 < len(blocks):
            handles.append(blocks[i + 1].register_forward_pre_hook(
                lambda module, args, kwargs, i=i: keep(i, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            ))
    try:
        model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            output_hidden_states=False,
            logits_to_keep=1,
            use_cache=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    final = kept.pop("final")
    return final, {i: kept[i] if i + 1 < len(blocks) else final for i in layers}


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DeepSpeed / DDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (wrapped) causal LM: `get_decoder().layers` (Llama, Mistral, Qwen, h1rl hybrids)."""
    bare = _unwrap(model)
    layers = getattr(bare.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(bare).__name__}: its decoder has no `layers` list to align hidden states on")
    return layers


def alignment_layers(model: nn.Module, which: str) -> list[int]:
    """Layer indices whose outputs `hidden_alignment` compares: the m2 layers, or every layer."""
    config = _unwrap(model).config
    layout = getattr(config, "hybrid_block_layout", None) or ["t"] * config.num_hidden_layers
    return [i for i, code in enumerate(layout) if which == "all" or code == "m2"]


def batch_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    config: LossConfig,
    pad_length: int | None = None,
    rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """The distillation loss parts of one batch (`{"loss", "kl", "ce", "hidden", "tokens"}`).

    `pad_length`, `rows`: equal on every process, they make the number of loss chunks equal too (`distill_loss`)."""
    layers = alignment_layers(student, config.hidden_layers) if config.hidden_weight > 0 else []
    if layers and len(_decoder_layers(student)) != len(_decoder_layers(teacher)):
        raise ValueError(f"hidden alignment needs the same depth: student has {len(_decoder_layers(student))} "
                         f"layers, teacher {len(_decoder_layers(teacher))}")
    padded_right = right_padded(batch)  # one host read for both models
    h_s, states_s = hidden_states(student, batch, layers, padded_right)
    with torch.no_grad():
        h_t, states_t = hidden_states(teacher, batch, layers, padded_right)
    parts = distill_loss(
        h_s,
        h_t,
        _unwrap(student).get_output_embeddings(),
        _unwrap(teacher).get_output_embeddings(),
        batch["labels"],
        config,
        pad_length=pad_length,
        rows=rows,
    )
    parts["hidden"] = parts["kl"].new_zeros(())
    if layers:
        parts["hidden"] = hidden_alignment(states_s, states_t, batch.get("attention_mask"))
        parts["loss"] = parts["loss"] + config.hidden_weight * parts["hidden"]
    return parts


@torch.no_grad()
def evaluate_metric(
    model: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]], config: LossConfig, metric: str = "kl"
) -> float:
    """Token-weighted mean over `batches` of the KL to the teacher (`config.kind`, `config.temperature`) or of the
    LM loss (`metric="lm_loss"`: cross-entropy on the data). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0.0
    ce_only = dataclasses.replace(config, ce_weight=1.0, hidden_weight=0.0)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        parts = batch_loss(model, teacher, batch, config if metric == "kl" else ce_only)
        value = parts["kl"] if metric == "kl" else parts["ce"]
        total += float(value) * float(parts["tokens"])
        tokens += float(parts["tokens"])
    model.train(was_training)
    if tokens == 0:
        raise ValueError("the calibration batches hold no target tokens (all labels are -100)")
    return total / tokens


def set_trainable(model: nn.Module, mamba_only: bool) -> int:
    """Train every parameter, or only the m2 mixers' (`.mixer.`); returns the number of trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(not mamba_only or ".mixer." in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_arguments(
    config: TrainingConfig, output_dir: str, max_steps: int, learning_rate: float, save: bool = True, **overrides: Any
) -> TrainingArguments:
    """The stage's `TrainingArguments` from the typed `training` section (CPU when no GPU is present).

    Multi-process CPU runs get their gloo process group and accelerate state here (`h1rl.distributed`).
    """
    kwargs = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=config.bf16,
        activation_checkpointing=config.activation_checkpointing,
        seed=config.seed,
        deepspeed=deepspeed_config_path(config.deepspeed),
        report_to=config.report_to,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        **config.trainer_args,
        **prepare_training_kwargs(config.deepspeed),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class DistillTrainer(Trainer):
    """A `Trainer` whose loss is `batch_loss` against `teacher` (see the module docstring).

    `pad_length`: passed to the chunked loss, with the configured per-device batch size, so every process runs the
    same number of chunks (ZeRO-3); also the length cap of on-policy rows. `on_policy`: on the steps it picks, the
    batches' completions are sampled by the student (`h1rl.distill.on_policy`) before the Trainer counts their
    target tokens.
    """

    def __init__(self, *args: Any, teacher: nn.Module, loss_config: LossConfig, pad_length: int | None = None,
                 on_policy: OnPolicyConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The Trainer then counts the target tokens of the whole optimizer step (all accumulation micro-batches, all
        # processes) and passes them to compute_loss as `num_items_in_batch`.
        self.model_accepts_loss_kwargs = True
        self.loss_config = loss_config
        self.pad_length = pad_length
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            teacher = teacher.to(self.args.device)
        self.teacher = teacher
        self.on_policy = on_policy or OnPolicyConfig()
        self._parts: dict[str, list[float]] = defaultdict(list)
        if self.on_policy.fraction > 0:
            student = find_hybrid(self.model)
            if student is None:
                raise TypeError(f"on-policy distillation samples with h1rl's engine: the student must be an h1rl "
                                f"HybridForCausalLM, got {type(self.model).__name__}")
            if self.processing_class is None or self.processing_class.pad_token_id is None:
                raise ValueError("on-policy distillation needs the tokenizer (processing_class) with a pad token")
            self._stop_ids = stop_token_ids(student, self.processing_class)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches, their completions sampled by the student on on-policy steps (then counted)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        if not batches or not is_on_policy_step(self.on_policy, self.args.seed, step):
            self._parts["on_policy"].append(0.0)
            return batches, num_items
        from trl.models.utils import unwrap_model_for_generation

        processes, index = self.accelerator.num_processes, self.accelerator.process_index
        sampled = []
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            student = find_hybrid(unwrapped)
            for m, batch in enumerate(batches):
                rows = batch["input_ids"].shape[0]
                params = SamplingParams(
                    max_new_tokens=self.on_policy.max_completion_length,
                    temperature=self.on_policy.temperature,
                    stop_token_ids=self._stop_ids,
                    seed=sampling_seed(self.args.seed, step, m),
                    stream_rows=rows * processes,  # each process samples its rows of one shared stream
                    stream_offset=rows * index,
                )
                batch = {k: v.to(student.device) for k, v in batch.items()}
                new, stats = student_batch(student, batch, params, self.processing_class,
                                           self.pad_length or batch["input_ids"].shape[1] + params.max_new_tokens)
                for name, value in stats.items():
                    self._parts[f"on_policy/{name}"].append(value)
                sampled.append(new)
        self._parts["on_policy"].append(1.0)
        return sampled, self._get_num_items_in_batch(sampled, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher.eval()  # stays in eval mode whatever happens to the student
        # The chunks are sized for the configured batch size, equal on every process (not this micro-batch's rows).
        rows = self.args.per_device_train_batch_size if model.training else self.args.per_device_eval_batch_size
        parts = batch_loss(model, self.teacher, inputs, self.loss_config, self.pad_length, rows)
        for name in ("kl", "ce", "hidden"):
            self._parts[name].append(float(parts[name].detach()))
        loss = parts["loss"]
        # Weighted by this micro-batch's share of the step's target tokens: the gradient is then that of the mean over
        # all target tokens of the global batch, whatever the split into processes and accumulation steps (so N
        # processes train exactly like one process with the same global batch). Gradients are averaged across
        # processes, hence the factor num_processes.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None:
            share = parts["tokens"] / torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1)
            loss = loss * share * self.accelerator.num_processes
        return (loss, parts) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean loss parts since the last log (kl, and ce / hidden when they are used), and with on-policy
        steps their share and rollout statistics."""
        used = {"kl": True, "ce": self.loss_config.ce_weight > 0, "hidden": self.loss_config.hidden_weight > 0}
        for name, values in self._parts.items():
            if values and used.get(name, self.on_policy.fraction > 0):
                logs[name] = sum(values) / len(values)
        self._parts.clear()
        super().log(logs, start_time)
