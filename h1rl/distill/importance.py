"""Layer importance: which attention layers can become Mamba first. Two scorers, each a ranked table.

- Leave-one-out (`loo_table`): each candidate attention layer in turn is replaced by identity (the whole block is
  skipped, as Apriel-H1's `"i"` code does) and the increase of a metric over the current student is recorded. The
  metric is the distillation KL to the teacher on calibration batches, or the LM loss, or any user callback
  `eval_fn(model, teacher, batches) -> float` (lower is better; e.g. a benchmark error rate, as Apriel-H1 used).
- MIL-Mamba-Replacement (`mmr_table`): each candidate is swapped to a MIL-initialised m2 mixer, a short
  distillation probe of N steps is run (`probe`, the same `DistillTrainer` as the stages), and the metric after the
  probe is recorded, with the probe's final training loss.

Both rank ascending: first = least important (LOO) or easiest to replace (MMR). Tables are plain dicts, written as
JSON (`write_table`) and printed (`format_table`). Written by hand: no library scores layers this way; scoring is a
loop over layers around the shared metric, so it stays short.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from h1rl.distill.swap import layout_of, skip_layer, swap_to_mamba
from h1rl.models.modeling import HybridForCausalLM

Measure = Callable[[nn.Module], float]  # model -> metric on the calibration batches (lower is better)
Probe = Callable[[HybridForCausalLM], float]  # trains the model in place for N steps, returns its final train loss


def loo_table(student: HybridForCausalLM, candidates: Sequence[int], measure: Measure, metric: str) -> dict[str, Any]:
    """Leave-one-out: the metric increase when each candidate layer is skipped; ranked, least important first."""
    baseline = measure(student)
    rows = []
    for i in candidates:
        with skip_layer(student, i):
            value = measure(student)
        rows.append({"layer": i, "score": value - baseline, "metric_without_layer": value})
    return _table("loo", metric, student, baseline, rows, "increase of the metric when the layer is skipped")


def mmr_table(
    student: HybridForCausalLM, candidates: Sequence[int], measure: Measure, probe: Probe, metric: str, seed: int
) -> dict[str, Any]:
    """MIL-Mamba-Replacement: the metric after swapping each candidate and a short probe; ranked, easiest first."""
    baseline = measure(student)
    rows = []
    for i in candidates:
        swapped = swap_to_mamba(student, [i], seed=seed)
        after_swap = measure(swapped)
        start = time.perf_counter()
        probe_loss = probe(swapped)
        rows.append(
            {
                "layer": i,
                "score": measure(swapped),
                "metric_after_swap": after_swap,
                "probe_train_loss": probe_loss,
                "probe_seconds": round(time.perf_counter() - start, 2),
            }
        )
        del swapped
    return _table("mmr", metric, student, baseline, rows, "metric after swapping the layer and a short probe")


def choose(table: dict[str, Any], k: int) -> list[int]:
    """The first `k` layers of a ranked table, in increasing index order."""
    if k > len(table["ranking"]):
        raise ValueError(f"cannot swap {k} layers: the {table['scorer']} table ranks only {len(table['ranking'])}")
    return sorted(row["layer"] for row in table["ranking"][:k])


def write_table(table: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))
    return path


def format_table(table: dict[str, Any]) -> str:
    """The ranked table as aligned text (rank, layer, score and the other recorded values)."""
    rows = table["ranking"]
    extra = [key for key in (rows[0] if rows else {}) if key not in ("layer", "score")]
    head = ["rank", "layer", "score", *extra]
    lines = [
        f"{table['scorer']} importance ({table['score_meaning']}; metric {table['metric']}, "
        f"baseline {table['baseline']:.5f})",
        "  ".join(f"{h:>12}" for h in head),
    ]
    for rank, row in enumerate(rows, 1):
        values = [rank, row["layer"], row["score"], *(row[key] for key in extra)]
        lines.append("  ".join(f"{v:>12.5f}" if isinstance(v, float) else f"{v:>12}" for v in values))
    return "\n".join(lines)


def _table(scorer: str, metric: str, student: HybridForCausalLM, baseline: float, rows: list, meaning: str) -> dict:
    return {
        "scorer": scorer,
        "metric": metric,
        "score_meaning": meaning,
        "baseline": baseline,
        "layout": layout_of(student),
        "ranking": sorted(rows, key=lambda row: row["score"]),
    }
