"""Staged distillation of a hybrid from its teacher: importance scoring, layer swapping, KD losses, the trainer.

Modules: `config` (the typed run config and schedule check), `losses` (chunked reverse/forward KL, CE mix, hidden
alignment), `swap` (attention -> MIL-initialised m2, layer skipping), `importance` (leave-one-out and MMR tables),
`data` (texts / chat rows, padding, no packing), `trainer` (`DistillTrainer` on transformers' Trainer), `run`
(`h1rl distill`: the resumable staged run) and `report` (the docs' KL figures, on the bundled teacher).
See docs/distillation.md.
"""

from h1rl.distill.config import DistillConfig, LossConfig, StageConfig
from h1rl.distill.losses import distill_loss, token_kl
from h1rl.distill.swap import skip_layer, swap_to_mamba
from h1rl.distill.trainer import DistillTrainer

__all__ = [
    "DistillConfig",
    "DistillTrainer",
    "LossConfig",
    "StageConfig",
    "distill_loss",
    "skip_layer",
    "swap_to_mamba",
    "token_kl",
]
