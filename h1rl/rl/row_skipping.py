"""Rows with zero advantage left out of the GRPO training pass, where that leaves the gradient exact.

A row whose advantage is exactly zero (every row of a group whose rewards tie, with the usual 0/1 rewards)
contributes exactly zero to the loss and its gradient when the loss is normalised by the batch's precomputed token
count (`loss_type` "dapo", TRL's default, "cispo" or "vespo"), `beta` is 0 and no entropy term is in play
(`zero_advantage_rows_are_inert`). With `skip_zero_advantage_rows=True` (the default) `HybridGRPOTrainer._compute_loss`
then runs TRL's loss on the other rows only (`rows_with_advantage`): the same gradient up to float summation order,
for the compute of the rows that carry a signal. `train/rows_trained` logs the fraction kept.

Several processes: each keeps as many rows as the process that keeps the most (at least one): TRL gathers per-row
metrics, which needs equal counts, and every process must run a forward and backward (DDP, ZeRO). The rows added back
are zero-advantage rows, so the loss is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def zero_advantage_rows_are_inert(loss_type: str, beta: float, top_entropy_quantile: float, entropy_bonus: bool,
                                  aux_loss: bool) -> bool:
    """Whether a row with advantage 0 adds exactly nothing to the loss of its micro-batch: its policy term is
    -A * (clipped) ratio = 0, and the loss is divided by the batch's precomputed token count (`num_items_in_batch`),
    not by anything that counts this micro-batch's rows. A KL term, an entropy bonus or an entropy quantile mask
    (computed over the rows present) breaks this."""
    return (loss_type in ("dapo", "cispo", "vespo") and beta == 0.0 and top_entropy_quantile == 1.0
            and not entropy_bonus and not aux_loss)


def rows_with_advantage(inputs: dict, most: Callable[[int], int]) -> tuple[dict, float]:
    """`inputs` (TRL's micro-batch) restricted to its rows with a non-zero advantage, topped up with zero-advantage
    rows to the count of the process that keeps the most (`most`: the largest of an int over the processes); every
    per-row tensor (the importance-sampling ratio included) is sliced. Returns (inputs, fraction of rows kept);
    `inputs` itself when every row is kept."""
    advantages = inputs["advantages"]  # (R,) or (R, L)
    rows = advantages.shape[0]
    carries = (advantages != 0).reshape(rows, -1).any(1)  # (R,)
    count = most(int(carries.sum().clamp(min=1)))
    if count == rows:
        return inputs, 1.0
    order = torch.argsort((~carries).to(torch.uint8), stable=True)  # rows with an advantage first, in order
    index = order[:count].sort().values
    kept = {
        key: value.index_select(0, index.to(value.device))
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
        else value
        for key, value in inputs.items()
    }
    return kept, count / rows
