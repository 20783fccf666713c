r"""`accuracy_reward`: is the completion's final answer equal to the dataset's? Checked by math-verify in worker
processes that can be killed, with every failed check counted and logged, never a silent zero.

What is compared, per completion:
- the reference: the dataset column `answer_column` (default "answer"), wrapped in `$...$` unless it already holds
  math delimiters or a `\boxed{}`, then parsed by math-verify;
- the completion's answer: the inside of its last `\boxed{...}` (of the last assistant message, for chat
  completions); when there is no boxed answer, math-verify's own extraction over the whole text.
  (math-verify alone would take every boxed answer of a completion as a set, so "\boxed{3} or \boxed{4}" could
  pass for "{3, 4}"; the last one is the final answer.)

Outcomes, the reward, and the counter each one increments:

| outcome | reward | counter |
|---|---|---|
| math-verify says equal | 1.0 | `correct` |
| not equal | 0.0 | `wrong` |
| no answer found in the completion | 0.0 | `no_answer` |
| the reference does not parse (or is None) | None (TRL: not applicable) | `bad_gold` |
| the check ran out of time (worker alarm, or worker killed) | 0.0 | `timeouts` |
| the worker process died | 0.0 | `crashes` |
| math-verify raised | 0.0 | `errors` |

`checked` counts them all. The last three are failures of the checker, not of the policy: each call that has any
logs a warning, and through TRL's `log_metric` the fraction of each outcome per batch is logged as
`accuracy_reward/<outcome>` (plus `accuracy_reward/failed` for the three together); `log_extra` adds a per-sample
`accuracy_reward_status` column to TRL's completions table. `stats()` returns the running counters and
`reset_stats()` zeroes them.

The process pool (`h1rl.rewards.pool`) starts on the first call; `close()` (or a `with` block, or interpreter exit)
stops it. `prefetch(completions, **columns)` starts checks in the background (the GRPO trainer calls it as rollout
rows finish, so that checking overlaps decoding); the next call takes their results, so it returns the same rewards
as without the prefetch. A pickled copy (TRL hands reward functions to spawned processes in some modes) carries only
the settings: it starts its own pool and counts from zero.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from h1rl.rewards.pool import VerifierPool, default_num_workers
from h1rl.rewards.text import last_boxed, split_completion

logger = logging.getLogger(__name__)

# Outcome -> counter name in stats(); FAILURES are the checker's failures.
COUNTERS = {
    "correct": "correct",
    "wrong": "wrong",
    "no_answer": "no_answer",
    "bad_gold": "bad_gold",
    "timeout": "timeouts",
    "crash": "crashes",
    "error": "errors",
}
FAILURES = ("timeout", "crash", "error")


def accuracy_reward(
    answer_column: str = "answer", timeout_s: float = 5.0, num_workers: int | None = None
) -> AccuracyReward:
    r"""Reward 1.0 when the completion's last `\boxed{}` answer equals the `answer_column` value, else 0.0.

    Args:
        answer_column: dataset column that holds the reference answer (TRL passes every dataset column to reward
            functions as a keyword argument).
        timeout_s: longest time one completion may take to check; past it the worker is killed and the completion
            scores 0.0 and counts as a timeout.
        num_workers: verifier processes; default min(4, available CPUs). Each training process has its own pool.

    Example:
    >>> from h1rl.rewards import accuracy_reward
    >>> with accuracy_reward() as reward:
    ...     reward(
    ...         completions=[r"so \boxed{\frac{1}{2}}", r"so \boxed{0.6}", "no idea"],
    ...         answer=["0.5", "0.5", "0.5"],
    ...     )
    ...     reward.stats()["checked"]
    [1.0, 0.0, 0.0]
    3
    """
    return AccuracyReward(answer_column=answer_column, timeout_s=timeout_s, num_workers=num_workers)


class AccuracyReward:
    """The callable `accuracy_reward` returns; see the module docstring for what it compares and counts."""

    __name__ = "accuracy_reward"  # TRL names the reward's logs after it

    def __init__(self, answer_column: str = "answer", timeout_s: float = 5.0, num_workers: int | None = None):
        if not timeout_s > 0:
            raise ValueError(f"accuracy_reward: timeout_s must be > 0, got {timeout_s}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"accuracy_reward: num_workers must be >= 1 (or None for the default), got {num_workers}")
        self.answer_column = answer_column
        self.timeout_s = timeout_s
        self.num_workers = num_workers or default_num_workers()
        self._pool: VerifierPool | None = None
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # runs `prefetch`'s checks in the background
        self._prefetched: dict[str, tuple[Future, int]] = {}  # task key -> (its background check, index in it)

    def __call__(
        self,
        completions: list[str] | list[list[dict[str, Any]]],
        log_extra=None,
        log_metric=None,
        **kwargs: Any,
    ) -> list[float | None]:
        tasks, task_rows = self._tasks(completions, kwargs)
        statuses: list[str] = ["bad_gold"] * len(completions)  # rows without a reference keep this
        details: dict[int, str] = {}
        for i, (status, detail) in zip(task_rows, self._results(tasks)):
            statuses[i] = status
            details[i] = detail
        self._record(statuses, details, log_extra, log_metric)
        return [1.0 if s == "correct" else None if s == "bad_gold" else 0.0 for s in statuses]

    def prefetch(self, completions: list[str] | list[list[dict[str, Any]]], **kwargs: Any) -> None:
        """Start checking these completions in the background and return at once. The GRPO trainer calls this as
        rollout rows finish, while the others still decode; the next call scoring the same completion against the
        same answer takes the result from here instead of checking it again (a check is a function of its task
        alone, as the pool's de-duplication already assumes), so the rewards are those of a call without it.
        Nothing is counted or logged here; the call does that."""
        tasks, _ = self._tasks(completions, kwargs)
        fresh = {}
        for task in tasks:
            key = json.dumps(task, sort_keys=True)
            if key not in self._prefetched and key not in fresh:
                fresh[key] = task
        if not fresh:
            return
        pool = self.pool
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accuracy-prefetch")
            future = self._executor.submit(pool.run, list(fresh.values()))
        for i, key in enumerate(fresh):
            self._prefetched[key] = (future, i)

    def _tasks(self, completions, kwargs: dict[str, Any]) -> tuple[list[dict], list[int]]:
        """The math-verify tasks of the completions that have a reference answer, and their rows."""
        golds = self._golds(kwargs, len(completions))
        tasks, rows = [], []
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            _, content = split_completion(completion, i)
            if gold is None:
                continue
            answer = last_boxed(content)
            tasks.append({"gold": gold, "answer": answer, "text": content if answer is None else ""})
            rows.append(i)
        return tasks, rows

    def _results(self, tasks: list[dict]) -> list[tuple[str, str]]:
        """(status, detail) of each task: prefetched ones from their background check, the others now; the
        prefetched results not asked for are dropped (they belonged to rows that were not scored)."""
        prefetched, self._prefetched = self._prefetched, {}
        keys = [json.dumps(task, sort_keys=True) for task in tasks]
        missing = [task for task, key in zip(tasks, keys) if key not in prefetched]
        now = iter(self.pool.run(missing) if missing else [])
        return [prefetched[key][0].result()[prefetched[key][1]] if key in prefetched else next(now) for key in keys]

    def _golds(self, kwargs: dict[str, Any], n: int) -> list[str | None]:
        if self.answer_column not in kwargs:
            columns = sorted(k for k in kwargs if k not in ("prompts", "completion_ids", "trainer_state"))
            raise KeyError(
                f"accuracy_reward needs the dataset column '{self.answer_column}' (answer_column="
                f"'{self.answer_column}'), but the columns passed were {columns}; set answer_column to the column "
                "that holds the reference answers"
            )
        golds = kwargs[self.answer_column]
        if len(golds) != n:
            raise ValueError(f"accuracy_reward: {len(golds)} '{self.answer_column}' values for {n} completions")
        out: list[str | None] = []
        for i, gold in enumerate(golds):
            if gold is not None and not isinstance(gold, (str, int, float)):
                raise TypeError(
                    f"accuracy_reward: column '{self.answer_column}' row {i} is a {type(gold).__name__}; expected a "
                    "string or a number"
                )
            out.append(None if gold is None else str(gold))
        return out

    def _record(self, statuses: list[str], details: dict[int, str], log_extra, log_metric) -> None:
        batch = Counter(statuses)
        with self._lock:
            self._counts["checked"] += len(statuses)
            for status, count in batch.items():
                self._counts[COUNTERS[status]] += count
        failed = sum(batch[s] for s in FAILURES)
        if failed:
            first = next(i for i, s in enumerate(statuses) if s in FAILURES)
            logger.warning(
                "accuracy_reward: %d of %d checks failed and scored 0 (timeouts %d, crashes %d, errors %d); first: "
                "sample %d, %s (%s)",
                failed, len(statuses), batch["timeout"], batch["crash"], batch["error"],
                first, statuses[first], details.get(first, ""),
            )  # fmt: skip
        if batch["bad_gold"]:
            logger.warning(
                "accuracy_reward: %d of %d samples have a reference answer that math-verify cannot parse (or None); "
                "they score None",
                batch["bad_gold"], len(statuses),
            )  # fmt: skip
        if log_metric is not None and statuses:
            for status in COUNTERS:
                log_metric(f"{self.__name__}/{status}", batch[status] / len(statuses))
            log_metric(f"{self.__name__}/failed", failed / len(statuses))
        if log_extra is not None:
            log_extra(f"{self.__name__}_status", list(statuses))

    @property
    def pool(self) -> VerifierPool:
        with self._lock:
            if self._pool is None:
                self._pool = VerifierPool(self.num_workers, self.timeout_s)
            return self._pool

    def stats(self) -> dict[str, int]:
        """Running counters: checked, correct, wrong, no_answer, bad_gold, timeouts, crashes, errors."""
        with self._lock:
            return {key: self._counts[key] for key in ("checked", *COUNTERS.values())}

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()

    def close(self) -> None:
        """Stop the worker processes and the prefetch thread (a later call starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._prefetched = {}
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> AccuracyReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"answer_column": self.answer_column, "timeout_s": self.timeout_s, "num_workers": self.num_workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"AccuracyReward(answer_column={self.answer_column!r}, timeout_s={self.timeout_s}, "
            f"num_workers={self.num_workers})"
        )
