"""The GRPO training pass's exact savings over TRL's: rows grouped by length, each prompt run once.

TRL computes the policy's per-token log-probs (training forward, old policy, reference model) with one forward over
the whole batch padded to its longest row. `HybridGRPOTrainer._get_per_token_logps_and_entropies` hands that call to
`logps_by_length`, which runs TRL's own forward (`forward`, given by the trainer) over groups of rows of similar
length, each trimmed to its own padding, under `HybridModel.sharing_prefix` where `share_prompt_prefix` says so.
Both are exact: a causal model's log-probs of a row do not depend on the padding after it nor on masked columns
before it (which its attention mask hides and its position ids skip), and the shared-prefix forward gives the plain
forward's log-probs and gradients up to float rounding (`tests/rl/test_length_chunks.py`,
`tests/models/test_shared_prefix.py`).

Several processes: DDP broadcasts buffers and ZeRO-3 gathers parameters in every forward, so every process must run
as many forwards: the group count is agreed (the fewest any process needs, `fewest`), and under TRL's `batch_size`
(its no-grad old and reference log-probs) the rows are cut into TRL's own count of blocks, sorted by length.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from h1rl.rollout.engine import find_hybrid

Forward = Callable[[torch.Tensor, torch.Tensor, int], tuple]  # (ids, mask, logits_to_keep) -> TRL's (logps, ent, aux)


def plan_length_chunks(lengths: torch.Tensor, max_chunks: int, tolerance: float = 0.05) -> list[torch.Tensor]:
    """Split rows into at most `max_chunks` groups of similar length, so that a forward over each group trimmed to
    its own longest row computes as few padded positions as possible.

    `lengths` (R,) long: each row's length (its last real column + 1). Rows are sorted by length and cut into
    contiguous groups by dynamic programming over the distinct lengths, minimising the positions computed
    (sum over groups of rows x longest row); the fewest groups within `tolerance` of the best split's positions
    (relative to one group) are chosen, since each extra forward costs time of its own; with `tolerance=0` that is
    exactly min(`max_chunks`, distinct lengths) groups, since splitting a group of several lengths always saves
    positions. Returns the row indices of each group (ascending within a group), shortest group first.
    """
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    order = torch.argsort(lengths.cpu(), stable=True)  # (R,)
    values, counts = torch.unique_consecutive(lengths.cpu()[order], return_counts=True)  # (U,), (U,)
    U, K = values.numel(), min(max_chunks, values.numel())
    if K == 1:
        return [order.sort().values]
    rows_before = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).double()  # (U+1,) rows with a shorter length
    # cost[i, j]: positions computed by one group holding distinct lengths i..j-1 (its rows x its longest length)
    i, j = torch.arange(U + 1)[:, None], torch.arange(U + 1)[None, :]
    cost = (rows_before[None, :] - rows_before[:, None]) * values.double()[(j - 1).clamp(min=0)]  # (U+1, U+1)
    cost = torch.where(i < j, cost, torch.full_like(cost, float("inf")))
    best, cuts = [cost[0]], []  # best[k-1][j]: fewest positions covering lengths 0..j-1 with k groups
    for _ in range(1, K):
        total = best[-1][:, None] + cost  # (U+1, U+1): the first groups end at i, one more group covers i..j-1
        value, arg = total.min(0)
        best.append(value)
        cuts.append(arg)
    finals = torch.stack([b[U] for b in best])  # (K,)
    k = int((finals - finals[-1] <= tolerance * finals[0]).nonzero()[0]) + 1  # fewest groups near the best
    bounds, j = [U], U
    for level in range(k - 1, 0, -1):
        j = int(cuts[level - 1][j])
        bounds.append(j)
    bounds = [int(rows_before[b]) for b in reversed(bounds)]  # row offsets into `order`: 0 = bounds[0] < ... = R
    return [order[a:b].sort().values for a, b in zip([0] + bounds[:-1], bounds) if b > a]


def pad_to(t: torch.Tensor, width: int, left: bool) -> torch.Tensor:
    """t (R, W, ...) zero-padded to `width` columns, on the left or the right."""
    missing = width - t.shape[1]
    if missing == 0:
        return t
    pad = t.new_zeros(t.shape[0], missing, *t.shape[2:])
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def sharing_prefix(model: torch.nn.Module, prompt_width: int, setting: bool | None, on_cuda: bool
                   ) -> AbstractContextManager:
    """`HybridModel.sharing_prefix(prompt_width)` when `share_prompt_prefix` (`setting`; None: on on CPU, off on
    CUDA, see `h1rl.rl.trainer`) says so for this batch, else a no-op context."""
    hybrid = find_hybrid(model)
    share = (not on_cuda) if setting is None else setting
    if share and hybrid is not None and prompt_width >= 1:
        return hybrid.model.sharing_prefix(prompt_width)
    return nullcontext()


def logps_by_length(
    forward: Forward,
    input_ids: torch.Tensor,  # (R, Tp + Tc) prompts left-padded, completions right-padded
    attention_mask: torch.Tensor,  # (R, Tp + Tc)
    logits_to_keep: int,  # Tc: TRL scores the completion, the last logits_to_keep columns
    max_chunks: int,
    fewest: Callable[[int], int],  # the smallest of an int over the processes (identity with one process)
    batch_size: int | None = None,  # TRL's cap on the rows of one forward (its no-grad calls)
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """TRL's log-probs (and entropies) of the completion tokens (R, Tc), computed over groups of rows of similar
    length, each trimmed to its own padding (`plan_length_chunks`), padding positions 0; and the fraction of TRL's
    padded rectangle computed."""
    R, width = input_ids.shape
    prompt_width = width - logits_to_keep
    columns = torch.arange(1, width + 1, device=attention_mask.device)
    ends = torch.where(attention_mask.bool(), columns, 0).amax(1).clamp(min=prompt_width + 1)  # (R,) last real + 1
    if batch_size and prompt_width >= 1:
        # as many forwards as TRL runs, so every process runs the same count, each over rows of similar length
        order = torch.argsort(ends.cpu(), stable=True)
        chunks = [order[i : i + batch_size].sort().values for i in range(0, R, batch_size)]
    elif batch_size:
        chunks = None  # no prompt column to keep: TRL's own forward (and its blocks)
    else:
        chunks = None if prompt_width < 1 else plan_length_chunks(ends, max_chunks)  # None: one forward, as TRL
        count = fewest(1 if chunks is None else len(chunks))  # as many groups as the process that splits least
        if chunks is not None and count != len(chunks):
            chunks = plan_length_chunks(ends, count, tolerance=0.0)  # exactly `count` groups (see its doc)
    if chunks is None:
        logps, entropies, _ = forward(input_ids, attention_mask, logits_to_keep)
        return logps, entropies, 1.0
    logps, entropies, computed = [], [], 0
    for rows in chunks:
        rows = rows.to(input_ids.device)
        mask = attention_mask.index_select(0, rows)  # (n, Tp + Tc)
        used = mask.bool().any(0).nonzero()[:, 0]  # columns some row of the group needs
        first = min(int(used[0]), prompt_width - 1) if used.numel() else prompt_width - 1  # >= 1 prompt column
        end = max(int(used[-1]) + 1, prompt_width + 1) if used.numel() else prompt_width + 1  # >= 1 scored
        lp, ent, _ = forward(input_ids.index_select(0, rows)[:, first:end], mask[:, first:end], end - prompt_width)
        logps.append(pad_to(lp, logits_to_keep, left=False))
        entropies.append(None if ent is None else pad_to(ent, logits_to_keep, left=False))
        computed += rows.numel() * (end - first)
    inverse = torch.argsort(torch.cat(chunks)).to(input_ids.device)  # back to the caller's row order
    logps = torch.cat(logps).index_select(0, inverse)
    entropies = None if entropies[0] is None else torch.cat(entropies).index_select(0, inverse)
    return logps, entropies, computed / (R * width)
