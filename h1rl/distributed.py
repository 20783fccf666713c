"""Multi-process set-up shared by `h1rl distill` and `h1rl grpo`: the process group, accelerate's state, DeepSpeed.

h1rl's trainers are transformers' `Trainer` and TRL's `GRPOTrainer`, so distribution is theirs: accelerate wraps the
model, shards the data and (with a DeepSpeed config) hands the model to DeepSpeed ZeRO. What they do not do well,
and this module does, before the training arguments are built (`prepare_training_kwargs`):

- **CPU runs.** Launched by `torchrun` / `deepspeed` / `accelerate launch` on a machine without a GPU, the
  Trainer with a DeepSpeed config builds an accelerate state with no backend and trains as world size 1 in every
  process, silently (each rank thinks it is rank 0; nothing is sharded). Here the process group is set up with
  gloo first (through DeepSpeed's `init_distributed` when DeepSpeed is used), and the Trainer is told to use that
  state (`accelerator_config.use_configured_state`). The world size is then checked against the launcher's.
- **The `deepspeed` launcher** passes `--local_rank=N` on the command line; `strip_launcher_args` drops it (the
  rank is read from `LOCAL_RANK`, which every launcher sets).
- **DeepSpeed configs** (`h1rl/recipes/deepspeed/*.json`) leave every batch-derived field "auto": transformers
  fills micro batch, gradient accumulation, clipping, optimizer and precision settings from the run's own config, so
  a recipe never repeats them and cannot contradict them. `deepspeed_config_path` resolves the short names
  ("zero2", "zero3", "zero3_offload") to those files, wherever the package is installed; `prepare_training_kwargs`
  does the same for the `deepspeed_config_file` of an accelerate config (the bundled ones say `zero3`, not a path,
  which `accelerate launch` hands to the processes as ACCELERATE_DEEPSPEED_CONFIG_FILE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEEPSPEED_CONFIGS = ("zero2", "zero3", "zero3_offload")


def launched_world_size() -> int:
    """Processes the launcher started (`WORLD_SIZE`, set by torchrun, deepspeed and accelerate launch); 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config_path(name_or_path: str | None) -> str | None:
    """A DeepSpeed JSON config: one of the bundled names (`zero2`, `zero3`, `zero3_offload`) or a file path."""
    if name_or_path is None:
        return None
    if name_or_path in DEEPSPEED_CONFIGS:
        from h1rl.recipes import find_bundled

        path = find_bundled(f"deepspeed/{name_or_path}")
    else:
        path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"deepspeed: {name_or_path} is neither a file nor one of the bundled configs {', '.join(DEEPSPEED_CONFIGS)}"
        )
    return str(path)


def deepspeed_requested(deepspeed: str | dict | None) -> bool:
    """Whether this run uses DeepSpeed: a config in the run's own config, or one from `accelerate launch`."""
    return bool(deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def prepare_training_kwargs(deepspeed: str | dict | None = None) -> dict[str, Any]:
    """Set up the process group when this is a multi-process CPU run; extra `TrainingArguments` fields to pass.

    Call it before building `TrainingArguments` / `GRPOConfig`. On GPUs, or in a single process, nothing is done
    (accelerate and DeepSpeed set up NCCL themselves) and `{}` is returned. In every case, a bundled short name in
    ACCELERATE_DEEPSPEED_CONFIG_FILE (set by `accelerate launch` from its config's `deepspeed_config_file`) becomes
    that file's path.
    """
    import torch

    accelerate_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if accelerate_file in DEEPSPEED_CONFIGS:
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = deepspeed_config_path(accelerate_file)
    world = launched_world_size()
    if world == 1 or torch.cuda.is_available():
        return {}
    from accelerate import PartialState

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, without its detection warning
    if deepspeed_requested(deepspeed):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # accelerate then starts the group through DeepSpeed
        state = PartialState(backend="gloo")
    else:
        state = PartialState(cpu=True, backend="gloo")  # plain data parallel (DDP) over gloo
    if state.num_processes != world:
        raise RuntimeError(
            f"the launcher started {world} processes but the process group has {state.num_processes}: "
            "check MASTER_ADDR / MASTER_PORT and that every process runs the same command"
        )
    return {"accelerator_config": {"use_configured_state": True}}


def strip_launcher_args(argv: list[str]) -> list[str]:
    """`argv` without the `--local_rank=N` / `--local-rank N` the `deepspeed` launcher appends (LOCAL_RANK has it)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(arg)
    return out
