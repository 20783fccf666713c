"""`h1rl distill --config RECIPE [--key value ...]`: a staged distillation run, resumable at any point.

    h1rl distill --config distill_tiny                     # a bundled recipe by name, or a YAML file's path
    h1rl distill --config distill_tiny --stages.1.max_steps 50 --training.learning_rate 5e-4
    h1rl distill --help                                    # every key, with its default and meaning
    h1rl distill --config distill_qwen3_1p7b --dry-run     # check and plan: layouts, data, memory; no weights

`run_distillation(config)` is the library entry point. For each stage of `config.stages`: choose the layers to swap
(explicit list, or the best `num_layers` of a LOO / MMR importance table computed on the current student), swap them
to MIL-initialised m2 mixers, measure the KL to the teacher, distill for `max_steps` with `DistillTrainer`, save a
Hugging Face checkpoint and a manifest, measure again.

Run directory (`output_dir`):

    resolved_config.yaml            the config as run: file + overrides, defaults filled in
    importance/stage_K_{loo,mmr}.json   ranked importance tables (also printed)
    stage_K/swap.json               the swap decided at the start of stage K, with the KL before and after it
    stage_K/checkpoint-*/           Trainer checkpoints within the stage (`training.save_steps`)
    stage_K/final/                  the student at the end of stage K: a standard HF checkpoint + tokenizer
    stage_K/manifest.json           layout, swapped layers, importance table, metrics; written last: stage done
    manifest.json                   all completed stages' manifests and the current layout

Resume: run the same command again. Stages with a `manifest.json` are not redone; the current stage reuses its
`swap.json` (no rescoring) and continues from its last complete `checkpoint-*` (weights, optimizer, scheduler, step
counter, data position: the Trainer's own resume; `h1rl.checkpoints`, the policy of `h1rl grpo` too). A rerun with a
different config in the same `output_dir` is refused, naming the keys that changed. Stage K is numbered from 1 in
directories and messages (`stages.K-1` in the config).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from h1rl.assets import model_path
from h1rl.checkpoints import last_complete_checkpoint, record_config
from h1rl.config_io import ConfigError, import_object, load_config, to_dict
from h1rl.data.tokenizer import load_tokenizer
from h1rl.distill.config import DistillConfig, StageConfig, check_schedule, scorer_candidates
from h1rl.distill.data import build_dataset, calibration_batches, make_collator
from h1rl.distill.importance import choose, format_table, loo_table, mmr_table, write_table
from h1rl.distill.swap import layout_of, swap_to_mamba
from h1rl.distill.trainer import DistillTrainer, evaluate_metric, set_trainable, training_arguments
from h1rl.distributed import prepare_training_kwargs
from h1rl.log import setup_logging
from h1rl.models import HybridForCausalLM
from h1rl.models.convert import convert_teacher

logger = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module, nn.Module, list[dict[str, torch.Tensor]]], float]  # (model, teacher, batches) -> metric


@dataclass
class _Run:
    """What every stage of a run shares."""

    config: DistillConfig
    out: Path
    main_process: bool
    teacher: nn.Module
    tokenizer: PreTrainedTokenizerBase
    train_ds: Any  # datasets.Dataset
    collator: Any
    kl: Callable[[nn.Module], float]  # the stage metric: the loss's KL on the calibration batches
    measure: Callable[[nn.Module], float]  # the importance metric (KL, LM loss or eval_fn)
    metric_name: str


def run_distillation(
    config: DistillConfig, callbacks: list[TrainerCallback] | None = None, eval_fn: EvalFn | None = None
) -> dict[str, Any]:
    """Run (or resume) every stage of `config`; returns the run manifest (also in `output_dir/manifest.json`).

    `callbacks`: extra Trainer callbacks for the stages (not the MMR probes). `eval_fn(model, teacher, batches) ->
    float`: replaces the importance metric (`importance.eval_fn` names one in the config).
    """
    out = Path(config.output_dir)
    prepare_training_kwargs(config.training.deepspeed)  # before anything asks for the accelerate state
    main_process = PartialState().is_main_process
    dtype = getattr(torch, config.model.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    teacher_path = model_path(config.model.teacher)
    teacher_config = AutoConfig.from_pretrained(teacher_path)
    start_layout = (
        list(AutoConfig.from_pretrained(config.model.student).hybrid_block_layout)
        if config.model.student
        else ["t"] * teacher_config.num_hidden_layers
    )
    try:
        check_schedule(config.stages, start_layout)
    except ValueError as err:
        raise ConfigError(f"schedule: {err}") from err
    record_config(out, to_dict(config), main_process, refuse_changes=True)

    tokenizer = load_tokenizer(config.model.tokenizer or teacher_path, padding_side="right")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    data = config.data
    collator = make_collator(tokenizer)
    train_ds = build_dataset(data.dataset_name, tokenizer, data, data.max_samples)
    calib_ds = build_dataset(data.calibration_dataset_name or data.dataset_name, tokenizer, data,
                             data.calibration_samples)
    batches = calibration_batches(calib_ds, collator, data.calibration_samples, data.calibration_batch_size)
    if eval_fn is None and config.importance.eval_fn:
        eval_fn = import_eval_fn(config.importance.eval_fn)

    def kl(model: nn.Module) -> float:
        return evaluate_metric(model, teacher, batches, config.loss, "kl")

    def measure(model: nn.Module) -> float:
        if eval_fn is not None:
            return float(eval_fn(model, teacher, batches))
        return evaluate_metric(model, teacher, batches, config.loss, config.importance.metric)

    run = _Run(config, out, main_process, teacher, tokenizer, train_ds, collator, kl, measure,
               metric_name=config.importance.eval_fn or ("eval_fn" if eval_fn else config.importance.metric))
    manifests: list[dict[str, Any]] = []
    student: HybridForCausalLM | None = None
    for k, stage in enumerate(config.stages, 1):
        stage_dir = out / f"stage_{k}"
        if (stage_dir / "manifest.json").is_file():
            manifests.append(json.loads((stage_dir / "manifest.json").read_text()))
            student = None  # a later stage starts from this stage's final checkpoint
            continue
        if student is None:
            previous = out / f"stage_{k - 1}" / "final"
            student = initial_student(config, teacher, dtype) if k == 1 else load_student(previous, dtype)
        student, decision = _swap(run, k, stage, student.to(device))
        manifest = _distill(run, k, stage, student, decision, callbacks)
        manifests.append(manifest)
        if main_process:
            _write_json(stage_dir / "manifest.json", manifest)
            _write_json(out / "manifest.json", _run_manifest(config, manifests))
    run_manifest = _run_manifest(config, manifests)
    if main_process:
        _write_json(out / "manifest.json", run_manifest)
    return run_manifest


def _swap(run: _Run, k: int, stage: StageConfig, student: HybridForCausalLM) -> tuple[HybridForCausalLM, dict]:
    """Stage k's swap: decided once (scored if the stage has a scorer) and recorded in stage_k/swap.json; a rerun
    replays the recorded decision."""
    config, stage_dir = run.config, run.out / f"stage_{k}"
    seed = config.training.seed + k
    swap_file = stage_dir / "swap.json"
    if swap_file.is_file():
        decision = json.loads(swap_file.read_text())
        student = swap_to_mamba(student, decision["layers"], seed=seed) if decision["layers"] else student
        return student, decision

    layout_before, kl_before = layout_of(student), run.kl(student)
    layers, table_file = stage.layers, None
    if stage.scorer is not None:
        candidates = scorer_candidates(config.stages, k - 1, layout_before)
        if stage.scorer == "loo":
            table = loo_table(student, candidates, run.measure, run.metric_name)
        else:
            probe = _make_probe(run, k, stage)
            table = mmr_table(student, candidates, run.measure, probe, run.metric_name, seed=seed)
            shutil.rmtree(run.out / "importance" / f"stage_{k}_probe", ignore_errors=True)
        layers = choose(table, stage.num_layers)
        table_file = f"importance/stage_{k}_{stage.scorer}.json"
        if run.main_process:
            write_table(table, run.out / table_file)
            logger.info("stage %d: %s", k, format_table(table))
    layers = _same_on_all_processes(list(layers))
    if layers:
        student = swap_to_mamba(student, layers, seed=seed)
    decision = {
        "layers": layers,
        "scorer": stage.scorer,
        "importance_table": table_file,
        "layout_before": layout_before,
        "layout_after": layout_of(student),
        "kl_before_swap": kl_before,
        "kl_after_swap": run.kl(student),
        "decided_at": _now(),
    }
    if run.main_process:
        _write_json(swap_file, decision)
    return student, decision


def _distill(run: _Run, k: int, stage: StageConfig, student: HybridForCausalLM, decision: dict,
             callbacks: list[TrainerCallback] | None) -> dict[str, Any]:
    """Stage k's distillation (resumed from its last checkpoint-*), final checkpoint and manifest."""
    config, stage_dir = run.config, run.out / f"stage_{k}"
    logger.info("stage %d: swap %s -> layout %s; KL %.4f before the swap, %.4f after", k,
                decision["layers"] or "nothing", ",".join(layout_of(student)), decision["kl_before_swap"],
                decision["kl_after_swap"])
    set_trainable(student, mamba_only=stage.freeze_non_mamba)
    trainer = DistillTrainer(
        model=student,
        args=training_arguments(config.training, str(stage_dir), stage.max_steps, _stage_lr(config, stage)),
        train_dataset=run.train_ds,
        data_collator=run.collator,
        processing_class=run.tokenizer,
        teacher=run.teacher,
        loss_config=config.loss,
        pad_length=config.data.max_length,
        on_policy=config.on_policy,
        callbacks=callbacks,
    )
    last = last_complete_checkpoint(stage_dir)
    result = trainer.train(resume_from_checkpoint=None if last is None else str(last))
    set_trainable(student, mamba_only=False)
    trainer.save_model(str(stage_dir / "final"))
    kl_after = run.kl(student)
    logger.info("stage %d: KL %.4f after %d steps; checkpoint %s", k, kl_after, trainer.state.global_step,
                stage_dir / "final")
    return {
        "stage": k,
        "name": stage.name,
        "scorer": stage.scorer,
        "swapped_layers": decision["layers"],
        "layout_before": decision["layout_before"],
        "layout": layout_of(student),
        "importance_table": decision["importance_table"],
        "checkpoint": f"stage_{k}/final",
        "resumed_from": None if last is None else str(Path(last).relative_to(run.out)),
        "freeze_non_mamba": stage.freeze_non_mamba,
        "metrics": {
            "metric": f"{config.loss.kind} (temperature {config.loss.temperature}) on calibration data",
            "kl_before_swap": decision["kl_before_swap"],
            "kl_after_swap": decision["kl_after_swap"],
            "kl_after_distill": kl_after,
            "train_loss": result.training_loss,
            "global_step": trainer.state.global_step,
            "max_steps": stage.max_steps,
        },
        "started_at": decision["decided_at"],
        "finished_at": _now(),
    }


def _stage_lr(config: DistillConfig, stage: StageConfig) -> float:
    return stage.learning_rate if stage.learning_rate is not None else config.training.learning_rate


def initial_student(config: DistillConfig, teacher, dtype: torch.dtype) -> HybridForCausalLM:
    """`model.student` loaded, or the teacher converted with every layer kept as attention (same logits)."""
    if config.model.student:
        return load_student(config.model.student, dtype)
    layout = ["t"] * teacher.config.num_hidden_layers
    return convert_teacher(teacher, layout, ssm_cfg=config.model.ssm_cfg, dtype=dtype, seed=config.training.seed)


def load_student(path: str | Path, dtype: torch.dtype) -> HybridForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if not isinstance(model, HybridForCausalLM):
        raise TypeError(f"student checkpoint {path} is a {type(model).__name__}, not an h1rl hybrid")
    return model


def import_eval_fn(spec: str) -> EvalFn:
    """`"package.module:function"` -> the function (importance.eval_fn)."""
    return import_object(spec, "importance.eval_fn")


def _make_probe(run: _Run, k: int, stage: StageConfig) -> Callable[[HybridForCausalLM], float]:
    """MMR's probe: `probe_steps` of the stage's distillation on a swapped copy; returns the last quarter's loss."""
    config = run.config
    lr = config.importance.probe_learning_rate or _stage_lr(config, stage)

    def probe(model: HybridForCausalLM) -> float:
        set_trainable(model, mamba_only=stage.freeze_non_mamba)
        args = training_arguments(config.training, str(run.out / "importance" / f"stage_{k}_probe"),
                                  config.importance.probe_steps, lr, save=False, logging_steps=1, report_to="none",
                                  disable_tqdm=True)
        trainer = DistillTrainer(model=model, args=args, train_dataset=run.train_ds, data_collator=run.collator,
                                 processing_class=run.tokenizer, teacher=run.teacher, loss_config=config.loss,
                                 pad_length=config.data.max_length, on_policy=config.on_policy)
        trainer.remove_callback(PrinterCallback)  # probes train quietly; their result goes into the table
        trainer.train()
        set_trainable(model, mamba_only=False)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        tail = losses[-max(1, len(losses) // 4) :]
        return sum(tail) / len(tail)

    return probe


def _same_on_all_processes(layers: list[int]) -> list[int]:
    """The main process's choice, on every process (scores can differ in the last bits between processes)."""
    if PartialState().num_processes > 1:
        layers = broadcast_object_list([layers])[0]
    return layers


def _run_manifest(config: DistillConfig, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    done = len(manifests) == len(config.stages)
    return {
        "teacher": config.model.teacher,
        "config": "resolved_config.yaml",
        "completed_stages": len(manifests),
        "total_stages": len(config.stages),
        "complete": done,
        "layout": manifests[-1]["layout"] if manifests else None,
        "final_checkpoint": manifests[-1]["checkpoint"] if done else None,
        "stages": manifests,
        "updated_at": _now(),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a reader or an interrupted run never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    """`h1rl distill --config RECIPE [--log_level L] [--key value ...]`; returns the exit status (2 for a bad config or
    schedule)."""
    from h1rl.flags import flag_overrides, keys_epilog
    from h1rl.log import LOG_LEVELS
    from h1rl.recipes import find

    parser = argparse.ArgumentParser(
        prog="h1rl distill", description="staged distillation of a hybrid, from a recipe plus --key value overrides "
        "of any key below (nested keys with dots, list items by index: --stages.0.max_steps 10)",
        epilog=keys_epilog(DistillConfig), allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe: a bundled name (h1rl recipes) or a YAML file")
    parser.add_argument("--log_level", default="passive", choices=LOG_LEVELS,
                        help="passive (default): h1rl's progress at info, transformers as it is; other levels set both")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe and print its plan (layouts, parameters, data, memory per GPU) without "
                             "loading weights (h1rl.dry_run)")
    parser.add_argument("--gpus", type=int, default=None, help="with --dry-run: plan for this many GPUs")
    args, rest = parser.parse_known_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_config(DistillConfig, find(args.config, kind="distill"), flag_overrides(rest))
        if args.dry_run:
            from h1rl.dry_run import distill_plan

            print(distill_plan(config, gpus=args.gpus).text())
            return 0
        manifest = run_distillation(config)
    except (ConfigError, FileNotFoundError) as err:
        print(f"h1rl distill: error: {err}", file=sys.stderr)
        return 2
    print(f"h1rl distill: {manifest['completed_stages']}/{manifest['total_stages']} stages done; layout "
          f"{','.join(manifest['layout'])}; checkpoint {Path(config.output_dir) / manifest['final_checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
