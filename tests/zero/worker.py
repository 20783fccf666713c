"""One rank of a multi-process test run, started by torchrun: `worker.py {grpo,distill} CONFIG REPORT_DIR [--key v]`.

Runs `h1rl grpo` / `h1rl distill` exactly as the command line does (the library entry points), then writes what the
test compares into REPORT_DIR: `rank{R}.json` (world size and rank as the trainer saw them) and `rank{R}.pt` (the
trained parameters as this rank holds them, gathered first under ZeRO-3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value on this rank (ZeRO-3 partitions are gathered first)."""
    import contextlib

    params = dict(model.named_parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
    with gathered:
        return {n: p.detach().clone().float() for n, p in params.items()}


def report(out: Path, model: torch.nn.Module, accelerator, log_history: list[dict] | None = None) -> None:
    rank = accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    torch.save(full_parameters(model), out / f"rank{rank}.pt")
    info = {
        "num_processes": accelerator.num_processes,
        "process_index": rank,
        "torch_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "distributed_type": str(accelerator.distributed_type),
        "log_history": log_history or [],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))


class ReportAtEnd(TrainerCallback):
    """Distillation builds its trainers itself: report from the last stage's `on_train_end`."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from accelerate import PartialState

        report(self.out, model, PartialState())


def main(argv: list[str]) -> None:
    mode, config_path, out, *flags = argv
    out = Path(out)
    if mode == "grpo":
        from h1rl.rl.config import parse_grpo_args
        from h1rl.rl.run import run_grpo

        trainer = run_grpo(parse_grpo_args(["--config", config_path, *flags]))
        report(out, trainer.model, trainer.accelerator, trainer.state.log_history)
    elif mode == "distill":
        from h1rl.config_io import load_config
        from h1rl.distill.config import DistillConfig
        from h1rl.distill.run import run_distillation
        from h1rl.flags import flag_overrides

        run_distillation(load_config(DistillConfig, config_path, flag_overrides(flags)), callbacks=[ReportAtEnd(out)])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    from h1rl.distributed import strip_launcher_args

    main(strip_launcher_args(sys.argv[1:]))  # the deepspeed launcher adds --local_rank=N
