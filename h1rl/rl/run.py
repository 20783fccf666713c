"""`h1rl grpo --config RECIPE [--key value ...]`: a GRPO run from a recipe, resumable after any interruption.

    h1rl grpo --config grpo_math --learning_rate 1e-5 --max_steps 5       # a bundled recipe by name, or a file
    h1rl grpo --help                                                       # every key: TRL's and h1rl's
    accelerate launch --config_file $(h1rl recipes path accelerate/zero3) -m h1rl.cli grpo --config grpo_math

What a run does, in order:
1. parses the recipe and the flags into `GRPOScriptArguments`, `HybridGRPOConfig` and `HybridModelConfig` with TRL's
   `TrlParser` (`h1rl.rl.config`): an unknown key fails here, before anything loads, naming the closest valid one;
2. writes every key as parsed to `output_dir/resolved_config.yaml` (a recipe that `--config` reads back); resuming
   with a changed config logs the keys that changed;
3. loads the dataset (hub name or local json/jsonl/parquet/csv), checks the prompt and answer columns (a missing one is
   named, with the columns that exist), and shapes prompts as chat messages when asked;
4. builds the rewards (`h1rl.rewards`) with TRL's `reward_weights`;
5. loads the hybrid checkpoint and its tokenizer, adds LoRA with TRL's `get_peft_config` if `use_peft`, and trains with
   `HybridGRPOTrainer`;
6. resumes from the newest *complete* checkpoint in `output_dir` if there is one (a checkpoint is complete once
   `trainer_state.json`, which transformers writes last, parses), so a run killed at any point and started again
   with the same command continues where it left off; with a fixed seed the final weights equal those of an
   uninterrupted run on CPU (rollouts are seeded by step, see `HybridGRPOTrainer`);
7. saves the final model and tokenizer to `output_dir/final`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from h1rl.config_io import ConfigError, diff_keys, import_object, parse_yaml
from h1rl.rl.config import GRPOArgs, GRPOScriptArguments, parse_grpo_args

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompts(cfg: GRPOScriptArguments):
    """The dataset with a `prompt` column (text or chat messages) and the answer column, validated."""
    from datasets import load_dataset

    path = Path(cfg.dataset_name)
    if path.suffix in LOCAL_FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"dataset_name: {cfg.dataset_name} does not exist")
        dataset = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(cfg.dataset_name, name=cfg.dataset_config, split=cfg.dataset_train_split)
    missing = [c for c in (cfg.prompt_column, cfg.answer_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{cfg.dataset_name}: missing column(s) {missing} (prompt_column / answer_column); "
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
                raise ValueError(f"{cfg.dataset_name}: row {index}: empty prompt")
            if cfg.chat:
                messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
                prompt = messages + [{"role": "user", "content": prompt}]
        elif not (isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)):
            raise ValueError(f"{cfg.dataset_name}: row {index}: prompt must be text or a list of chat messages")
        return {"prompt": prompt}

    return dataset.map(shape, with_indices=True)


def build_rewards(names: list[str], options: dict[str, dict[str, Any]] | None = None,
                  answer_column: str = "answer") -> list:
    """Reward callables (TRL's contract) from their names (`reward_funcs`) and options (`reward_kwargs`).

    A built-in's options go to its factory; a function named by import path (`package.module:function`, or TRL's
    `package.module.function`) is the reward itself, or, when it has options, a factory called with them."""
    from h1rl import rewards

    factories = {
        "accuracy": lambda **kw: rewards.accuracy_reward(answer_column=answer_column, **kw),
        "format": rewards.format_reward,
        "length": rewards.overlong_penalty,
    }
    options = options or {}
    funcs = []
    for name in names:
        kwargs = options.get(name, {})
        if name in factories:
            factory = factories[name]
        else:
            spec = name if ":" in name else ":".join(name.rsplit(".", 1))
            func = import_object(spec, f"reward_funcs: {name}")
            if not callable(func):
                raise ValueError(f"reward_funcs: {name} is not callable")
            if not kwargs:
                funcs.append(func)
                continue
            factory = func
        try:
            funcs.append(factory(**kwargs))
        except TypeError as err:
            raise ValueError(f"reward_kwargs.{name}: {err}") from err
    return funcs


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


def run_grpo(args: GRPOArgs):
    """Train per `args` (`parse_grpo_args` / `grpo_args_from_mapping`), resuming if its output_dir holds a checkpoint;
    returns the trainer, or None when the run in output_dir is already complete (its last checkpoint at max_steps and
    its final model saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from h1rl.rl.trainer import HybridGRPOTrainer

    script, training, model_args = args.script, args.training, args.model
    out = Path(training.output_dir)
    resume = last_complete_checkpoint(out)
    saved = out / "resolved_config.yaml"
    if resume is not None and saved.exists():
        changed = diff_keys(parse_yaml(saved.read_text()), args.recipe)
        if changed:
            logger.warning("resuming %s with a changed config: %s", resume, ", ".join(changed))
    if training.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(args.recipe, sort_keys=False))

    if resume is not None and (out / "final" / "config.json").exists() and 0 < training.max_steps <= int(
        resume.name.split("-")[-1]
    ):  # resuming would run one step past max_steps (transformers' Trainer does), then overwrite final/
        logger.warning("%s is complete (%s, max_steps %d, final model in %s): nothing to do", out, resume.name,
                       training.max_steps, out / "final")
        return None

    dataset = load_prompts(script)
    reward_funcs = build_rewards(script.reward_funcs, script.reward_kwargs, script.answer_column)
    model_dir = Path(model_args.model_name_or_path)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"model_name_or_path: {model_dir} has no config.json (expected an h1rl or Apriel-H1 "
                                "checkpoint; convert a transformer with h1rl convert)")
    dtype = model_args.dtype or ("bfloat16" if training.bf16 else "float32")
    init_kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "revision": model_args.model_revision,
                   **({"attn_implementation": model_args.attn_implementation}
                      if model_args.attn_implementation else {}),
                   **(training.model_init_kwargs or {})}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **init_kwargs)
    trainer = HybridGRPOTrainer(model=model, reward_funcs=reward_funcs, args=training, train_dataset=dataset,
                                processing_class=tokenizer, peft_config=get_peft_config(model_args))
    if resume is not None:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    for func in reward_funcs:
        if hasattr(func, "close"):
            func.close()
    return trainer


def main(argv: list[str] | None = None) -> int:
    """`h1rl grpo --config RECIPE [--key value ...]`; returns the exit status (2 for a bad recipe or flag)."""
    from h1rl.log import setup_logging

    try:
        args = parse_grpo_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"h1rl grpo: error: {err}", file=sys.stderr)
        return 2
    setup_logging(args.training.log_level)
    run_grpo(args)
    return 0
