"""The figure of docs/distillation.md: KL to the teacher per stage, MIL initialisation only vs after distillation.

Writes the recipe's data (default: the bundled distill_tiny, on 2000 arithmetic problems of `h1rl.data.arithmetic`
with their worked solutions), runs the recipe on the bundled teacher with 64 held-out problems as its calibration data,
then for each stage's layout measures on them:

- "MIL init only": the teacher converted straight to that layout (Mamba-in-Llama, no distillation at all);
- "after swap": the layout reached from the previous stage's distilled student, right after the swap;
- "after distill": the same student at the end of the stage.

Prints the table, writes `report.json` and `kl_per_stage.png` to `--out`. Deterministic for a given machine.

Run (about 5 minutes on 2 CPU cores):

    python -m h1rl.distill.report --out runs/distill_report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from h1rl.assets import model_path
from h1rl.config_io import load_config
from h1rl.data import ArithmeticTask, write_jsonl
from h1rl.data.tokenizer import load_tokenizer
from h1rl.distill.config import DistillConfig
from h1rl.distill.data import build_dataset, calibration_batches, make_collator
from h1rl.distill.run import run_distillation
from h1rl.distill.trainer import evaluate_metric
from h1rl.models.convert import convert_teacher


def kl_report(out_dir: str | Path, recipe: str | Path, train_size: int = 2000) -> dict:
    """Run the recipe on fresh arithmetic data under `out_dir` and measure the per-stage KL table (the docstring)."""
    out = Path(out_dir)
    start = time.perf_counter()
    train = write_jsonl(ArithmeticTask(3, seed=0).generate(train_size, "train"), out / "data" / "train.jsonl")
    held_out = write_jsonl(ArithmeticTask(3, seed=0).generate(64, "test"), out / "data" / "held_out.jsonl")
    config = load_config(DistillConfig, recipe, [f"output_dir={out / 'run'}", f"data.dataset_name={train}",
                                                 f"data.calibration_dataset_name={held_out}",
                                                 "data.calibration_samples=64"])
    run = run_distillation(config)  # its stage metrics are measured on the held-out rows (the calibration data)

    teacher_path = model_path(config.model.teacher)
    tokenizer = load_tokenizer(teacher_path, padding_side="right")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    calib = build_dataset(str(held_out), tokenizer, config.data, 64)
    batches = calibration_batches(calib, make_collator(tokenizer), 64, config.data.calibration_batch_size)
    rows = []
    for stage in run["stages"]:
        mil_only = convert_teacher(teacher, stage["layout"], ssm_cfg=config.model.ssm_cfg, seed=config.training.seed)
        rows.append({
            "stage": stage["stage"],
            "name": stage["name"],
            "swapped": stage["swapped_layers"],
            "layout": ",".join(stage["layout"]),
            "kl_mil_init_only": evaluate_metric(mil_only, teacher, batches, config.loss),
            "kl_after_swap": stage["metrics"]["kl_after_swap"],
            "kl_after_distill": stage["metrics"]["kl_after_distill"],
            "steps": stage["metrics"]["global_step"],
        })
    report = {
        "metric": run["stages"][0]["metrics"]["metric"],
        "recipe": str(recipe),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(rows, out / "kl_per_stage.png")
    return report


def format_report(report: dict) -> str:
    head = f"{'stage':<12}{'layout':<16}{'swapped':<10}{'MIL init only':>15}{'after swap':>12}{'after distill':>15}"
    lines = [f"KL to the teacher ({report['metric']}, 64 held-out problems)", head]
    for r in report["rows"]:
        lines.append(f"{r['stage']} {r['name'] or '':<10}{r['layout']:<16}{str(r['swapped']):<10}"
                     f"{r['kl_mil_init_only']:>15.4f}{r['kl_after_swap']:>12.4f}{r['kl_after_distill']:>15.4f}")
    lines.append(f"({report['seconds']} s)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the report's figure needs matplotlib: pip install matplotlib") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("kl_mil_init_only", "MIL init only (teacher -> layout)"),
              ("kl_after_swap", "right after the swap"),
              ("kl_after_distill", "after the stage's distillation")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"stage {r['stage']}\n{r['layout']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("KL to the teacher (calibration)")
    ax.legend(fontsize=8)
    ax.set_title("Staged distillation of the bundled teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h1rl.distill.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/distill_report")
    parser.add_argument("--recipe", default="distill_tiny", help="a bundled recipe's name or a YAML file")
    parser.add_argument("--train-size", type=int, default=2000, help="arithmetic problems to distill on")
    args = parser.parse_args(argv)
    from h1rl.log import setup_logging
    from h1rl.recipes import find

    setup_logging()
    try:
        args.recipe = find(args.recipe, kind="distill")
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest
    report = kl_report(args.out, args.recipe, args.train_size)
    print(format_report(report))
    print(f"figure: {Path(args.out) / 'kl_per_stage.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
