r"""`h1rl grpo --config RECIPE [--key value ...]`: a GRPO run from a recipe, resumable after any interruption.

    h1rl grpo --config grpo_math --learning_rate 1e-5 --max_steps 5       # a bundled recipe by name, or a file
    h1rl grpo --help                                                       # every key: TRL's and h1rl's
    h1rl grpo --config grpo_apriel_h1_15b --dry-run [--gpus 16]            # check and plan, no weights (h1rl.dry_run)
    accelerate launch --config_file $(h1rl recipes path accelerate/zero3) -m h1rl.cli grpo --config grpo_math

What a run does, in order:
1. parses the recipe and the flags into `GRPOScriptArguments`, `HybridGRPOConfig` and `HybridModelConfig` with TRL's
   `TrlParser` (`h1rl.rl.config`): an unknown key fails here, before anything loads, naming the closest valid one;
2. writes every key as parsed to `output_dir/resolved_config.yaml` (a recipe that `--config` reads back); resuming
   with a changed config logs the keys that changed (`h1rl.checkpoints`);
3. loads the dataset (`h1rl.data.loading`: hub name or local json/jsonl/parquet/csv), checks the prompt and answer
   columns (a missing one is named, with the columns that exist), extracts the reference answers (GSM8K's `#### N`,
   MATH's `\boxed{}`), and shapes prompts as chat messages when asked;
4. builds the rewards (`h1rl.rewards`) with TRL's `reward_weights`;
5. loads the hybrid checkpoint and its tokenizer, adds LoRA with TRL's `get_peft_config` if `use_peft`, and trains with
   `HybridGRPOTrainer`;
6. resumes from the newest *complete* checkpoint in `output_dir` if there is one (`h1rl.checkpoints`: a checkpoint
   is complete once `trainer_state.json`, which transformers writes last, parses), so a run killed at any point and
   started again with the same command continues where it left off; with a fixed seed the final weights equal those
   of an uninterrupted run on CPU (rollouts are seeded by step, see `HybridGRPOTrainer`);
7. saves the final model and tokenizer to `output_dir/final`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from h1rl.checkpoints import checkpoint_step, last_complete_checkpoint, record_config
from h1rl.config_io import ConfigError, import_object
from h1rl.rl.config import GRPOArgs, GRPOScriptArguments, parse_grpo_args

logger = logging.getLogger(__name__)


def load_prompts(cfg: GRPOScriptArguments):
    """The dataset of `cfg` with a `prompt` column (chat messages, or text with `chat: false`) and the reference answer
    extracted into `answer_column` (`h1rl.data.loading.load_problems`)."""
    from h1rl.data.loading import load_problems

    return load_problems(cfg.dataset_name, prompt_column=cfg.prompt_column, answer_column=cfg.answer_column,
                         answer_format=cfg.answer_format, system_prompt=cfg.system_prompt, chat=cfg.chat,
                         split=cfg.dataset_train_split, dataset_config=cfg.dataset_config,
                         max_samples=cfg.max_samples)


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


def run_grpo(args: GRPOArgs):
    """Train per `args` (`parse_grpo_args` / `grpo_args_from_mapping`), resuming if its output_dir holds a checkpoint;
    returns the trainer, or None when the run in output_dir is already complete (its last checkpoint at max_steps and
    its final model saved)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from h1rl.data.tokenizer import load_tokenizer
    from h1rl.rl.trainer import HybridGRPOTrainer

    script, training, model_args = args.script, args.training, args.model
    out = Path(training.output_dir)
    resume = last_complete_checkpoint(out)
    record_config(out, args.recipe, main_process=training.process_index == 0)
    if resume is not None and (out / "final" / "config.json").exists() and \
            0 < training.max_steps <= checkpoint_step(resume):
        # resuming would run one step past max_steps (transformers' Trainer does), then overwrite final/
        logger.warning("%s is complete (%s, max_steps %d, final model in %s): nothing to do", out, resume.name,
                       training.max_steps, out / "final")
        return None

    dataset = load_prompts(script)
    reward_funcs = build_rewards(script.reward_funcs, script.reward_kwargs, script.answer_column)
    model_dir = model_args.model_name_or_path
    if Path(model_dir).exists() and not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"model_name_or_path: {model_dir} has no config.json (expected an h1rl or Apriel-H1 "
                                "checkpoint; convert a transformer with h1rl convert)")
    dtype = model_args.dtype or ("bfloat16" if training.bf16 else "float32")
    init_kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "revision": model_args.model_revision,
                   **({"attn_implementation": model_args.attn_implementation}
                      if model_args.attn_implementation else {}),
                   **(training.model_init_kwargs or {})}
    tokenizer = load_tokenizer(model_dir)
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
    from h1rl.dry_run import grpo_plan, pop_flags
    from h1rl.log import setup_logging

    try:
        dry, options, argv = pop_flags(sys.argv[1:] if argv is None else argv)
        args = parse_grpo_args(argv)
    except (ConfigError, ValueError) as err:
        print(f"h1rl grpo: error: {err}", file=sys.stderr)
        return 2
    setup_logging(args.training.log_level)
    if dry:  # check and plan the run (no weights, no downloads); h1rl.dry_run
        try:
            rewards = build_rewards(args.script.reward_funcs, args.script.reward_kwargs, args.script.answer_column)
            print(grpo_plan(args, rewards, **options).text())
        except (FileNotFoundError, ValueError) as err:
            print(f"h1rl grpo --dry-run: error: {err}", file=sys.stderr)
            return 2
        return 0
    run_grpo(args)
    return 0
