"""DAPO's dynamic sampling for `HybridGRPOTrainer`: prompt groups whose rewards all tie are replaced by fresh ones.

A group whose G rewards are equal has zero advantage and gives no gradient. With `dynamic_sampling_rounds > 0` such
groups are replaced by groups of fresh prompts, generated and scored in up to that many extra rounds per batch (the
cap). Groups still tied after the last round stay in the batch, so its size never changes. Logged as
`dynamic_sampling/*`.

Several processes: each refills its own groups (it must hold whole groups, checked by the trainer) and all run the
same rounds with equally many fresh groups, as TRL's scoring (which gathers across processes) needs; fresh prompts
then differ by process, so such a run is not identical to a single-process one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from h1rl.rl.training_pass import pad_to


def merge_rows(target: dict, source: dict, target_rows: range, source_rows: range) -> dict:
    """`target` with rows `target_rows` replaced by `source`'s rows `source_rows` (per-row tensors re-padded).

    Prompts are left-padded and completions right-padded, so widths are matched on the matching side.
    """
    merged = dict(target)
    t_idx, s_idx = list(target_rows), list(source_rows)
    for key, value in target.items():
        other = source.get(key)
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or other is None:
            continue
        left = key.startswith("prompt")
        width = max(value.shape[1], other.shape[1]) if value.dim() > 1 else None
        if width is not None:
            value, other = pad_to(value, width, left), pad_to(other, width, left)
        value = value.clone()
        value[t_idx] = other[s_idx].to(value.dtype)
        merged[key] = value
    return merged


def tied_groups(rewards_per_func: torch.Tensor, weights: torch.Tensor, G: int, process_index: int,
                num_processes: int) -> torch.Tensor:
    """Per row of this process (R,) bool: whether its group's weighted rewards have zero spread, as TRL computes them.

    `rewards_per_func` (R_all, F) are TRL's rewards gathered over all processes; with dynamic sampling each process
    holds whole groups, so this process's rows are its slice of the gathered ones."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(1)  # (R_all,)
    grouped = rewards.view(-1, G)
    tied = ((grouped.max(1).values - grouped.min(1).values).abs() <= 1e-8).repeat_interleave(G)
    local = tied.numel() // num_processes
    return tied[process_index * local : (process_index + 1) * local]


def fresh_rows(dataset: Any, seed: int) -> Iterator[dict]:
    """An endless, seeded stream of dataset rows to refill tied groups."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(len(dataset), generator=generator).tolist():
            yield dataset[index]


def refill_tied_groups(
    output: dict,  # TRL's scored batch of this process, with "_tied" (R,) from `tied_groups`
    score_round: Callable[[list[dict]], dict],  # generate and score rows (the trainer's round), "_tied" included
    rows: Iterator[dict],  # fresh dataset rows
    G: int,
    rounds: int,  # at most this many extra rounds
    gather: Callable[[torch.Tensor], torch.Tensor],  # accelerate's gather over processes
) -> tuple[dict, dict[str, float]]:
    """The batch with tied groups replaced by untied fresh ones (TRL's per-row tensors merged in place of the tied
    rows; `num_items_in_batch` recounted), and the round's `dynamic_sampling/*` metrics."""
    tied = output.pop("_tied")
    dropped, done = int(gather(tied.sum().reshape(1)).sum()) // G, 0  # all processes
    while done < rounds:
        # every process runs the same rounds with the same number of rows (TRL's scoring gathers across them):
        # as many fresh groups as the process with the most tied groups needs
        need = int(gather(tied.sum().reshape(1)).max()) // G
        if need == 0:
            break
        fresh = [next(rows) for _ in range(need)]
        candidate = score_round([row for row in fresh for _ in range(G)])
        useful = ~candidate.pop("_tied")
        done += 1
        slots = tied.nonzero()[:, 0].view(-1, G)[:, 0]  # first row of each tied group
        sources = useful.nonzero()[:, 0].view(-1, G)[:, 0]
        for slot, source in zip(slots.tolist(), sources.tolist()):  # zip: stops at the shorter list
            output = merge_rows(output, candidate, range(slot, slot + G), range(source, source + G))
            tied[slot : slot + G] = False
    output["num_items_in_batch"] = gather(output["completion_mask"].sum()).sum()
    metrics = {"dynamic_sampling/tied_groups": float(dropped), "dynamic_sampling/extra_rounds": float(done),
               "dynamic_sampling/tied_after": float(int(gather(tied.sum().reshape(1)).sum()) // G)}
    return output, metrics
