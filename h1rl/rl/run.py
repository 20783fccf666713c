"""`h1rl grpo --config FILE [key=value ...]`: a GRPO run from a recipe, resumable after any interruption.

What a run does, in order:
1. loads `GRPORunConfig` from the YAML recipe plus overrides (unknown keys are errors naming the key) and writes
   the resolved config to `output_dir/resolved_config.yaml`;
2. loads the dataset (hub name or local json/jsonl/parquet), checks the prompt and answer columns (a missing one is
   named, with the columns that exist), and shapes prompts as chat messages when asked;
3. builds the rewards (`h1rl.rewards`) with their weights, and TRL's `GRPOConfig` from the `trl` mapping;
4. loads the hybrid checkpoint and its tokenizer, adds LoRA if configured, and trains with `HybridGRPOTrainer`;
5. resumes from the newest *complete* checkpoint in `output_dir` if there is one (a checkpoint is complete once
   `trainer_state.json`, which transformers writes last, parses), so a run killed at any point and started again
   with the same command continues where it left off; with a fixed seed the final weights equal those of an
   uninterrupted run on CPU (rollouts are seeded by step, see `HybridGRPOTrainer`);
6. saves the final model and tokenizer to `output_dir/final`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from h1rl.config_io import ConfigError, diff_keys, import_object, load_config, parse_yaml, save_config, to_dict
from h1rl.distributed import deepspeed_config_path, prepare_training_kwargs
from h1rl.rl.config import DataConfig, GRPORunConfig, RewardSpec

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_prompts(cfg: DataConfig):
    """The dataset with a `prompt` column (text or chat messages) and the answer column, validated."""
    from datasets import load_dataset

    path = Path(cfg.path)
    if path.suffix in LOCAL_FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"data.path: {cfg.path} does not exist")
        dataset = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(cfg.path, split=cfg.split)
    missing = [c for c in (cfg.prompt_column, cfg.answer_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{cfg.path}: missing column(s) {missing} (data.prompt_column / data.answer_column); "
            f"the dataset has {dataset.column_names}"
        )
    if cfg.max_samples is not None:
        dataset = dataset.select(range(min(cfg.max_samples, len(dataset))))
    if cfg.prompt_column != "prompt":
        if "prompt" in dataset.column_names:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(cfg.prompt_column, "prompt")

    def shape(row: dict[str, Any], index: int) -> dict[str, Any]:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"{cfg.path}: row {index}: empty prompt")
            if cfg.chat:
                messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
                prompt = messages + [{"role": "user", "content": prompt}]
        elif not (isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)):
            raise ValueError(f"{cfg.path}: row {index}: prompt must be text or a list of chat messages")
        return {"prompt": prompt}

    return dataset.map(shape, with_indices=True)


def build_rewards(specs: list[RewardSpec], answer_column: str) -> tuple[list, list[float]]:
    """Reward callables (TRL's contract) and their weights, from the run config."""
    from h1rl import rewards

    factories = {
        "accuracy": lambda **kw: rewards.accuracy_reward(answer_column=answer_column, **kw),
        "format": rewards.format_reward,
        "length": rewards.overlong_penalty,
    }
    funcs = []
    for i, spec in enumerate(specs):
        if spec.name in factories:
            factory = factories[spec.name]
        else:  # "package.module:function": the reward itself, or its factory when options are given
            func = import_object(spec.name, f"rewards.{i}.name")
            if not callable(func):
                raise ValueError(f"rewards.{i}.name: {spec.name} is not callable")
            if not spec.options:
                funcs.append(func)
                continue
            factory = func
        try:
            funcs.append(factory(**spec.options))
        except TypeError as err:
            raise ValueError(f"rewards[{spec.name}].options: {err}") from err
    return funcs, [spec.weight for spec in specs]


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` whose trainer_state.json (written last by transformers) parses, or None."""
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-")[-1]
        if not suffix.isdigit():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            logger.warning("ignoring incomplete checkpoint %s", path)
            continue
        candidates.append((int(suffix), path))
    return max(candidates)[1] if candidates else None


def run_grpo(cfg: GRPORunConfig):
    """Train per `cfg` (resuming if `cfg.output_dir` holds a checkpoint); returns the trainer, or None when the run in
    `cfg.output_dir` is already complete (its last checkpoint at max_steps and its final model saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    import h1rl  # noqa: F401  (registers the hybrid Auto classes)
    from h1rl.rl.trainer import HybridGRPOTrainer
    from h1rl.rollout import RolloutBudget

    out = Path(cfg.output_dir)
    resume = last_complete_checkpoint(out)
    saved = out / "resolved_config.yaml"
    if resume is not None and saved.exists():
        changed = diff_keys(parse_yaml(saved.read_text()), to_dict(cfg))
        if changed:
            logger.warning("resuming %s with a changed config: %s", resume, ", ".join(changed))
    save_config(cfg, saved)

    dataset = load_prompts(cfg.data)
    reward_funcs, weights = build_rewards(cfg.rewards, cfg.data.answer_column)
    trl_kwargs = dict(cfg.trl)
    trl_kwargs["deepspeed"] = deepspeed_config_path(trl_kwargs.get("deepspeed"))  # "zero2" etc. or a JSON file
    trl_kwargs.update(prepare_training_kwargs(trl_kwargs["deepspeed"]))  # multi-process CPU: gloo (see module)
    trl_kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    trl_kwargs.setdefault("bf16", torch.cuda.is_available())
    trl_kwargs.setdefault("report_to", [])
    try:
        args = GRPOConfig(output_dir=str(out), reward_weights=weights, **trl_kwargs)
    except TypeError as err:
        raise ValueError(f"trl: {err} (the trl mapping takes trl.GRPOConfig's fields)") from err

    if resume is not None and (out / "final" / "config.json").exists() and 0 < args.max_steps <= int(
        resume.name.split("-")[-1]
    ):  # resuming would run one step past max_steps (transformers' Trainer does), then overwrite final/
        logger.warning("%s is complete (%s, max_steps %d, final model in %s): nothing to do", out, resume.name,
                       args.max_steps, out / "final")
        return None

    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"model: {cfg.model} has no config.json (expected an h1rl or Apriel-H1 checkpoint)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    trainer = HybridGRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                                processing_class=tokenizer, peft_config=peft_config,
                                dynamic_sampling_rounds=cfg.dynamic_sampling_rounds,
                                skip_zero_advantage_rows=cfg.skip_zero_advantage_rows,
                                share_prompt_prefix=cfg.share_prompt_prefix, length_chunks=cfg.length_chunks,
                                rollout_budget=RolloutBudget(cfg.rollout_max_rows, cfg.rollout_memory_gb,
                                                             cfg.rollout_prefill_chunk),
                                importance_sampling_correction=cfg.importance_sampling_correction)
    if resume is not None:
        logger.warning("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    for func in reward_funcs:
        if hasattr(func, "close"):
            func.close()
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="h1rl grpo", description="GRPO on a hybrid model from a YAML recipe")
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trl.max_steps=10 data.max_samples=64")
    args = parser.parse_args(argv)
    try:
        from h1rl.recipes import find

        run_grpo(load_config(GRPORunConfig, find(args.config, kind="grpo"), args.overrides))
    except ConfigError as err:
        print(f"h1rl grpo: error: {err}", file=sys.stderr)
        return 2
    return 0
