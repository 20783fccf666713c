"""Partial rollouts for `HybridGRPOTrainer` (beyond TRL; Kimi k1.5's partial rollouts, APRIL's active partial rollouts).

A GRPO step waits for its longest completion: with RL's spread of lengths, a few rows decode alone at the end while
everything else waits. With `partial_rollout_budget` set, a rollout round decodes at most that many steps; the
prompt groups whose rows are still running then are set aside in a pool and continued in a later step, and the batch
is made of the groups that did complete.

- **Over-provisioning.** A round's candidates are the pool's groups (oldest first), the step's B new groups, and
  fresh groups from the dataset while the pool holds fewer than `partial_rollout_extra_groups`; the first B groups
  to complete, in that order, make the batch, and the others (finished or not) go back to the pool, which therefore
  stays near `partial_rollout_extra_groups` groups. If fewer than B groups have completed when the budget is spent,
  the unfinished rows get another budget of steps, and so on (with several processes, until every process has its
  B groups: each round is one engine call on every process, as ZeRO-3's synced decoding needs).
- **Continued from tokens.** A set-aside row is continued from its tokens: its prompt and completion so far are
  re-prefilled by the policy of the step that continues it (`h1rl.rollout.ResumedRow`), and its next tokens use the
  uniforms of the stream it was started from. Not from its saved decode state: that state was computed by an older
  policy, so continuing from it would follow neither the old policy nor the current one, and it would hold every
  attention layer's KV for every set-aside row (2.6 GiB per 33k-token row at the 15B shape) across steps. The
  prefill of prompt + partial completion is one parallel pass per continued row. Under an unchanged policy the
  continuation is exactly the uninterrupted one (`tests/rl/test_partial_rollouts.py`).
- **Off-policy tokens.** Tokens sampled by an older policy keep that policy's log-probs as their sampling log-probs;
  the trainer's importance-sampling correction (TRL's truncated IS, `h1rl.rl.importance`) then weighs them by the
  current policy's ratio, capped. It is forced on with partial rollouts: ratios are 1 (up to float rounding in
  float32) for tokens of the current policy, capped otherwise.
- **Checkpoints.** The pool is saved with every checkpoint (`partial_rollouts.pt`) and reloaded on resume, so a run
  killed and started again continues the rows it had set aside.

Off by default (`partial_rollout_budget: None`); off, the trainer runs exactly as without this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from h1rl.rollout import ResumedRow, Rollout

POOL_FILE = "partial_rollouts.pt"


@dataclass
class Group:
    """One prompt group's G rows across rounds: finished rows keep their completion, running ones are continued."""

    row: dict  # the dataset row (prompt and reward columns)
    prompt_ids: list[int]
    completions: list[list[int]] = field(default_factory=list)  # G: tokens so far (empty until started)
    logprobs: list[list[float]] = field(default_factory=list)  # G: their sampling log-probs
    origins: list[tuple[int, int, int]] = field(default_factory=list)  # G: each row's uniform stream
    running: list[bool] = field(default_factory=list)  # G: still running (set aside by a budget)
    started_step: int = -1  # the global step of its first round
    older_tokens: list[int] = field(default_factory=list)  # G: tokens sampled in earlier steps (older policies)

    @property
    def started(self) -> bool:
        return bool(self.completions)

    @property
    def complete(self) -> bool:
        return self.started and not any(self.running)


class PartialRollouts:
    """The pool of set-aside groups and one step's rounds (see the module docstring)."""

    def __init__(self, budget: int, extra_groups: int, num_generations: int):
        if budget < 1:
            raise ValueError(f"partial_rollout_budget must be >= 1 decode step (or None: off), got {budget}")
        if extra_groups < 1:
            raise ValueError(f"partial_rollout_extra_groups must be >= 1, got {extra_groups}: without groups beyond "
                             "the batch, every round must complete all of its groups and nothing is ever set aside")
        self.budget, self.extra_groups, self.G = budget, extra_groups, num_generations
        self.pool: list[Group] = []
        self.last_batch: list[Group] = []  # the groups of the last step's batch (for logs and tests)

    def step(
        self,
        inputs: list[dict],  # this process's rows of the step: B groups of G consecutive rows
        tokenize: Callable[[list[Any]], list[list[int]]],  # prompts -> their token ids, as TRL tokenizes them
        generate: Callable[..., Rollout],  # (prompts, counts, resumed, decode_budget, rows) -> Rollout
        fresh_rows: Iterator[dict],  # more dataset rows, for over-provisioning
        any_process: Callable[[bool], bool],  # whether the flag is set on any process
        global_step: int,
    ) -> tuple[list[dict], list[list[int]], list[list[float]], dict[str, float]]:
        """Run the rounds of one step: the batch's rows (B groups of G, in TRL's layout), each row's completion ids
        and sampling log-probs, and metrics."""
        G = self.G
        if len(inputs) % G:
            raise ValueError(f"partial rollouts need whole groups: {len(inputs)} rows is not a multiple of G = {G}")
        B = len(inputs) // G
        new = [inputs[i * G] for i in range(B)]
        extra = [next(fresh_rows) for _ in range(max(0, self.extra_groups - len(self.pool)))]
        for group in self.pool:  # what was sampled before this step came from older policies
            group.older_tokens = [len(c) for c in group.completions]
        candidates = self.pool + [Group(row, ids) for row, ids in zip(new + extra,
                                                                          tokenize([r["prompt"] for r in new + extra]))]
        rounds, decoded = 0, 0
        while True:
            # every process makes the same rounds (one engine call each), until every process has B complete groups
            need = sum(g.complete for g in candidates) < B
            if rounds and not any_process(need):
                break
            rounds += 1
            decoded += self._round(candidates, generate, global_step, budget=self.budget)
        complete = [g for g in candidates if g.complete]
        batch, rest = complete[:B], [g for g in candidates if not g.complete] + complete[B:]
        self.pool = sorted(rest, key=lambda g: g.started_step)
        self.last_batch = batch
        rows = [g.row for g in batch for _ in range(G)]
        completions = [c for g in batch for c in g.completions]
        logprobs = [lp for g in batch for lp in g.logprobs]
        carried = sum(g.started_step < global_step for g in batch)
        metrics = {"partial_rollouts/rounds": float(rounds), "partial_rollouts/pool_groups": float(len(self.pool)),
                   "partial_rollouts/carried_groups": float(carried), "partial_rollouts/decoded_tokens": float(decoded)}
        return rows, completions, logprobs, metrics

    def _round(self, groups: list[Group], generate: Callable[..., Rollout], global_step: int, budget: int) -> int:
        """One engine call: continue the running rows of started groups, start the others; returns tokens decoded."""
        resumed_at = [(g, i) for g in groups if g.started for i, running in enumerate(g.running) if running]
        fresh = [g for g in groups if not g.started]
        resumed = [ResumedRow(g.prompt_ids, g.completions[i], g.logprobs[i], g.origins[i]) for g, i in resumed_at]
        rows = [g.row for g, _ in resumed_at] + [g.row for g in fresh for _ in range(self.G)]  # of each output row
        out = generate([g.prompt_ids for g in fresh], [self.G] * len(fresh), resumed, budget, rows)
        completions, reasons = out.completions(), out.finish_reasons
        logprobs = [row[:n].tolist() for row, n in zip(out.logprobs, out.lengths.tolist())]
        for k, (g, i) in enumerate(resumed_at):
            g.completions[i], g.logprobs[i], g.running[i] = completions[k], logprobs[k], reasons[k] == "partial"
        offset = len(resumed_at)
        for j, g in enumerate(fresh):
            rows = range(offset + j * self.G, offset + (j + 1) * self.G)
            g.completions = [completions[r] for r in rows]
            g.logprobs = [logprobs[r] for r in rows]
            g.origins = [out.origins[r] for r in rows]
            g.running = [reasons[r] == "partial" for r in rows]
            g.started_step = global_step
            g.older_tokens = [0] * self.G
        resumed_before = out.resumed_lengths.sum().item() if out.resumed_lengths is not None else 0
        return int(out.lengths.sum()) - int(resumed_before)

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def save(self, directory: str | Path, process_index: int) -> None:
        """The pool as this process holds it, into a checkpoint directory."""
        path = Path(directory) / (POOL_FILE if process_index == 0 else f"partial_rollouts_{process_index}.pt")
        torch.save([g.__dict__ for g in self.pool], path)

    def load(self, directory: str | Path, process_index: int) -> bool:
        """The pool saved with a checkpoint, if there is one; whether one was found."""
        path = Path(directory) / (POOL_FILE if process_index == 0 else f"partial_rollouts_{process_index}.pt")
        if not path.exists():
            return False
        self.pool = [Group(**fields) for fields in torch.load(path, weights_only=False)]
        return True

    def callback(self, process_index: int):
        """A `TrainerCallback` saving the pool with each checkpoint and loading it when a run resumes."""
        from transformers import TrainerCallback

        partial = self

        class PoolCheckpoints(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if state.global_step > 0:  # resumed: the checkpoint of that step holds the pool
                    partial.load(Path(args.output_dir) / f"checkpoint-{state.global_step}", process_index)

            def on_save(self, args, state, control, **kwargs):
                partial.save(Path(args.output_dir) / f"checkpoint-{state.global_step}", process_index)

        return PoolCheckpoints()
