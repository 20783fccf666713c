"""`h1rl demo`: distill-then-RL end to end on the bundled teacher and task, on CPU, from a recipe.

    h1rl demo [--quick] [--config NAME|PATH] [--key value ...]      # e.g. --output_dir runs/demo2 --grpo.max_steps 5

The demo is a recipe like any other: the bundled `demo` (and `demo_quick` for `--quick`) maps onto `DemoConfig`,
whose `distill` section is the typed config `h1rl distill` reads and whose `grpo` section holds the flat keys of an
`h1rl grpo` recipe. Fields set to "auto" are filled in by the demo (paths inside `output_dir`, the demo's teacher).
Phases:

1. data: the synthetic arithmetic task's train split (GRPO prompts; distillation conversations) and test split;
2. evaluate the bundled teacher on the test split (`h1rl.eval`): greedy accuracy, and, when `sampled_eval` is set,
   pass@1 estimated from n samples at the sampling temperature (the quantity GRPO maximises);
3. distillation data: with `distill_data: teacher_traces`, the teacher's own greedy solutions of the training
   problems that math-verify scores correct (`h1rl.eval.trace_rows`), as Apriel-H1 distilled on its teacher's
   traces; with `solutions`, the task's reference solutions;
4. staged distillation into a hybrid (`h1rl.distill`), then evaluate it;
5. GRPO with the math-verify reward (`h1rl.rl`), then evaluate it;
6. rollout throughput of the hybrid (engine) vs the teacher (`generate`), same prompts;
7. `report.md`, `results.json` and PNG plots in `output_dir`, and a summary table on stdout.

Each phase leaves its results in `output_dir`; running the same command again skips what is done (distillation and
GRPO resume from their checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from h1rl.assets import BUNDLED
from h1rl.config_io import load_config, save_config
from h1rl.distill.config import DistillConfig
from h1rl.eval import EvalConfig
from h1rl.flags import flag_overrides, keys_epilog

logger = logging.getLogger(__name__)

AUTO = "auto"
DISTILL_DATA = ("teacher_traces", "solutions")


@dataclass
class TaskSpec:
    difficulty: int = 3  # h1rl.data.arithmetic level (the bundled teacher was trained on level 3)
    train_size: int = 2000  # problems for distillation and GRPO prompts
    test_size: int = 200  # held-out problems for every evaluation
    seed: int = 0


@dataclass
class DemoConfig:
    RENAMED: ClassVar[dict[str, str]] = {"out_dir": "output_dir"}

    output_dir: str
    distill: DistillConfig
    grpo: dict[str, Any]  # the keys of an `h1rl grpo` recipe: --grpo.KEY value sets one (`h1rl grpo --help` lists them)
    task: TaskSpec = field(default_factory=TaskSpec)
    eval: EvalConfig = field(default_factory=EvalConfig)  # greedy: one answer per problem
    # pass@1 from n samples per problem at a temperature (RL papers' usual figure; a smoother estimate than one
    # greedy answer for small models, whose greedy answers flip on many problems under small weight changes)
    sampled_eval: EvalConfig | None = None
    teacher: str = BUNDLED  # a teacher checkpoint directory, or "bundled": the bundled one (h1rl/assets/teacher)
    # what the student is distilled on: the teacher's correct greedy solutions of the training problems
    # ("teacher_traces", generated with the `eval` settings) or the task's reference solutions ("solutions")
    distill_data: str = "teacher_traces"
    throughput_new_tokens: int = 64  # generated tokens per row in the rollout throughput comparison

    def __post_init__(self):
        from h1rl.rl.config import check_grpo_keys

        if self.teacher == AUTO:
            raise ValueError(f"teacher: 'auto' is now {BUNDLED!r} (the bundled teacher)")
        if self.distill_data not in DISTILL_DATA:
            raise ValueError(f"distill_data: expected one of {', '.join(DISTILL_DATA)}, got {self.distill_data!r}")
        check_grpo_keys(self.grpo, "grpo")


def resolve(cfg: DemoConfig) -> DemoConfig:
    """Fill the "auto" fields with the demo's teacher and paths inside `output_dir`."""
    from h1rl.assets import model_path

    out = Path(cfg.output_dir)
    cfg.teacher = model_path(cfg.teacher)
    d = cfg.distill
    d.output_dir = str(out / "distill") if d.output_dir == AUTO else d.output_dir
    d.model.teacher = cfg.teacher if d.model.teacher == AUTO else d.model.teacher
    if d.data.dataset_name == AUTO:
        d.data.dataset_name = str(out / "data" / f"distill_{cfg.distill_data}.jsonl")
    if d.data.calibration_dataset_name == AUTO:
        d.data.calibration_dataset_name = str(out / "data" / "calibration.jsonl")
    g = cfg.grpo
    for key, value in (("output_dir", out / "grpo"), ("dataset_name", out / "data" / "train.jsonl")):
        if g.get(key, AUTO) == AUTO:
            g[key] = str(value)
    return cfg


def write_data(cfg: DemoConfig) -> dict[str, list[dict[str, Any]]]:
    """Write train (GRPO), reference-solution distillation and calibration files; return the splits' rows."""
    from h1rl.data import make_splits, to_chat, write_jsonl

    splits = make_splits(cfg.task.train_size, cfg.task.test_size, cfg.task.difficulty, cfg.task.seed)
    data = Path(cfg.output_dir) / "data"
    write_jsonl([{"question": r["question"], "answer": r["answer"]} for r in splits["train"]], data / "train.jsonl")
    system = cfg.grpo.get("system_prompt")
    chats = [{"messages": to_chat(r, system)} for r in splits["train"]]
    write_jsonl(chats, data / "distill_solutions.jsonl")
    write_jsonl(chats[: cfg.distill.data.calibration_samples], data / "calibration.jsonl")
    write_jsonl(splits["test"], data / "test.jsonl")
    return splits


def cached_evaluation(path: Path, what: str, model_dir: str, rows: list[dict], config) -> dict[str, Any]:
    """`h1rl.eval.evaluate` of `model_dir` on `rows`, cached in `path`: read back unless the checkpoint path, the
    evaluation settings or the problems differ from the cached ones, in which case it evaluates again."""
    from h1rl.eval import details_path, evaluate, read_results, write_results

    wanted = {"model": str(model_dir), "config": json.loads(json.dumps(asdict(config)))}
    cached = read_results(path) if path.exists() and details_path(path).exists() else None
    if cached is not None and all(cached.get(key) == value for key, value in wanted.items()) and \
            [p["question"] for p in cached["problems"]] == [r["question"] for r in rows]:
        return cached
    why = "" if cached is None else " (the cached evaluation used another checkpoint, settings or problems)"
    logger.info("evaluating %s on %d problems (n=%d, temperature %s)%s", what, len(rows), config.num_samples,
                config.temperature, why)
    results = evaluate(model_dir, rows, config=config)
    write_results(results, path)
    return results


def evaluate_once(name: str, model_dir: str, test_rows: list[dict], cfg: DemoConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on the test rows: {"greedy": results, "sampled": results (when configured)}, cached in
    output_dir/eval/<name>.json and <name>_sampled.json (`cached_evaluation`)."""
    configs = {"greedy": (cfg.eval, name), "sampled": (cfg.sampled_eval, f"{name}_sampled")}
    return {kind: cached_evaluation(Path(cfg.output_dir) / "eval" / f"{stem}.json", f"{name} (held-out, {kind})",
                                    model_dir, test_rows, config)
            for kind, (config, stem) in configs.items() if config is not None}


def write_teacher_traces(cfg: DemoConfig, train_rows: list[dict]) -> dict[str, Any]:
    """The distillation data of `distill_data: teacher_traces`: the teacher's greedy solutions of the training
    problems (the `eval` settings), those math-verify scores correct, as chat rows; returns counts for the report."""
    from h1rl.data import write_jsonl
    from h1rl.eval import trace_rows

    config = dataclasses.replace(cfg.eval, system_prompt=cfg.grpo.get("system_prompt"), num_samples=1, temperature=0.0,
                                 pass_k=[])
    results = cached_evaluation(Path(cfg.output_dir) / "eval" / "teacher_train.json", "the teacher (training problems)",
                                cfg.teacher, train_rows, config)
    rows = trace_rows(results)
    write_jsonl(rows, cfg.distill.data.dataset_name)
    logger.info("distillation data: the teacher's correct greedy solutions of %d of %d training problems -> %s",
                len(rows), len(train_rows), cfg.distill.data.dataset_name)
    return {"problems": len(train_rows), "kept": len(rows), "teacher_train_accuracy": results["accuracy"]}


THROUGHPUT_REPEATS = 3  # timed runs of each model (after one warm-up run each); the median is reported


def throughput(teacher_dir: str, hybrid_dir: str, test_rows: list[dict], cfg: DemoConfig) -> dict[str, float]:
    """Rollout tokens/s: the hybrid with the engine vs the teacher with `generate`, same prompts, G=8, no stops;
    median of THROUGHPUT_REPEATS alternating runs after a warm-up (one cold run swung the ratio from 1.5x to 0.9x)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h1rl.bench.rollout_bench import time_engine, time_generate

    tokenizer = AutoTokenizer.from_pretrained(hybrid_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for r in test_rows[:4]]
    width = min(map(len, prompts))
    prompts = [p[-width:] for p in prompts]  # equal lengths: generate's batch then needs no padding
    hybrid = AutoModelForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    n = cfg.throughput_new_tokens
    hybrid_runs, teacher_runs = [], []
    for _ in range(1 + THROUGHPUT_REPEATS):  # alternating; the first pair only warms up (first-call costs)
        hybrid_runs.append(time_engine(hybrid, prompts, 8, n)[0])
        teacher_runs.append(time_generate(teacher, prompts, 8, n, static=True))
    hybrid_tps, teacher_tps = statistics.median(hybrid_runs[1:]), statistics.median(teacher_runs[1:])
    return {"hybrid_tok_s": hybrid_tps, "teacher_tok_s": teacher_tps, "speedup": hybrid_tps / teacher_tps}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from h1rl.distill.run import run_distillation
    from h1rl.rl.config import grpo_args_from_mapping
    from h1rl.rl.run import run_grpo

    cfg = resolve(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "resolved_config.yaml")
    timings = {f"{phase}_s": 0.0 for phase in ("data", "eval", "traces", "distill", "grpo", "throughput")}
    start = time.perf_counter()

    def timed(phase: str, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        timings[f"{phase}_s"] += time.perf_counter() - t0
        return value

    splits = timed("data", write_data, cfg)
    test_rows = splits["test"]
    results: dict[str, Any] = {"teacher": timed("eval", evaluate_once, "teacher", cfg.teacher, test_rows, cfg)}
    traces = timed("traces", write_teacher_traces, cfg, splits["train"]) if cfg.distill_data == "teacher_traces" \
        else None

    logger.info("distilling %d stages into %s", len(cfg.distill.stages), cfg.distill.output_dir)
    manifest = timed("distill", run_distillation, cfg.distill)
    distilled = str(Path(cfg.distill.output_dir) / manifest["final_checkpoint"])
    results["hybrid_distilled"] = timed("eval", evaluate_once, "hybrid_distilled", distilled, test_rows, cfg)

    if cfg.grpo.get("model_name_or_path", AUTO) == AUTO:
        cfg.grpo["model_name_or_path"] = distilled
    grpo_args = grpo_args_from_mapping(cfg.grpo, "grpo")
    final = Path(grpo_args.training.output_dir) / "final"
    log_path = Path(grpo_args.training.output_dir) / "log_history.json"
    if not (final / "config.json").exists():
        logger.info("GRPO from %s into %s", grpo_args.model.model_name_or_path, grpo_args.training.output_dir)
        trainer = timed("grpo", run_grpo, grpo_args)
        log_path.write_text(json.dumps(trainer.state.log_history, indent=1))
    results["hybrid_grpo"] = timed("eval", evaluate_once, "hybrid_grpo", str(final), test_rows, cfg)

    speed = timed("throughput", throughput, cfg.teacher, str(final), test_rows, cfg)
    timings["total_s"] = time.perf_counter() - start

    summary = {
        "layout": manifest["layout"],
        "accuracy": {k: v["greedy"]["accuracy"] for k, v in results.items()},
        "throughput": speed,
        "timings": timings,
        "stages": [{"stage": s["stage"], "layout": s["layout"], "metrics": s.get("metrics", {})}
                   for s in manifest["stages"]],
        "distill_data": cfg.distill_data,
        "teacher_traces": traces,
    }
    if cfg.sampled_eval is not None:  # pass@k per model, from n samples at the sampling temperature
        summary["sampled"] = {k: {m: x for m, x in v["sampled"].items() if m.startswith("pass@")}
                              for k, v in results.items()}
        summary["sampled_eval"] = {"num_samples": cfg.sampled_eval.num_samples,
                                   "temperature": cfg.sampled_eval.temperature}
    metrics = {model: {kind: {k: v for k, v in r.items() if k != "problems"}  # per-problem rows stay in eval/
                       for kind, r in by_kind.items()} for model, by_kind in results.items()}
    (out / "results.json").write_text(json.dumps({"summary": summary, "eval": metrics,
                                                  "per_problem": str(out / "eval")}, indent=2))
    write_report(out, summary, json.loads(log_path.read_text()) if log_path.exists() else [])
    return summary


MODELS = {  # key: (label in tables, label under the bars)
    "teacher": ("teacher (transformer)", "teacher"),
    "hybrid_distilled": ("hybrid after distillation", "hybrid\n(distilled)"),
    "hybrid_grpo": ("hybrid after GRPO", "hybrid\n(+GRPO)"),
}


def accuracy_table(summary: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """Column names and per-model (label, values): greedy accuracy, then the sampled pass@k when measured."""
    sampled = summary.get("sampled")
    ks = sorted({m for v in sampled.values() for m in v}, key=lambda m: int(m[5:])) if sampled else []
    columns = ["greedy accuracy"]
    if sampled:
        spec = summary["sampled_eval"]
        columns += [f"{m} (n={spec['num_samples']}, T={spec['temperature']:g})" for m in ks]
    rows = []
    for key, (label, _) in MODELS.items():
        if key == "hybrid_distilled":
            label += f" ({','.join(summary['layout'])})"
        rows.append((label, [summary["accuracy"][key], *(sampled[key].get(m, float("nan")) for m in ks)]))
    return columns, rows


def print_summary(summary: dict[str, Any]) -> None:
    columns, rows = accuracy_table(summary)
    lines = [["model", *columns], *([label, *(f"{v:.3f}" for v in values)] for label, values in rows)]
    widths = [max(len(line[i]) for line in lines) + 2 for i in range(len(lines[0]))]
    print("\nheld-out accuracy")
    for line in lines:
        print("".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    speed = summary["throughput"]
    print(f"rollout tokens/s hybrid {speed['hybrid_tok_s']:.0f} vs teacher {speed['teacher_tok_s']:.0f} "
          f"({speed['speedup']:.2f}x); total {summary['timings']['total_s']:.0f} s")


def write_report(out: Path, summary: dict[str, Any], grpo_log: list[dict]) -> None:
    """report.md plus accuracy.png, distill_kl.png and grpo_reward.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, rows = accuracy_table(summary)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / len(columns)
    colors = ["#27c", "#4a8", "#bbb", "#e94"]
    for j, name in enumerate(columns):
        values = [row_values[j] for _, row_values in rows]
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, values, width, label=name, color=colors[j % len(colors)])
        for x, v in zip(xs, values):
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(rows)), [short for _, short in MODELS.values()])
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    stages = summary["stages"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("kl_after_swap", "right after the swap"), ("kl_after_distill", "after distillation")):
        values = [s["metrics"].get(key) for s in stages]
        if all(v is not None for v in values):
            ax.plot([s["stage"] for s in stages], values, "o-", label=label)
    ax.set_xlabel("stage")
    ax.set_ylabel("KL to the teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "distill_kl.png", dpi=120)
    plt.close(fig)

    rewards = [e["reward"] for e in grpo_log if "reward" in e]
    window = max(1, min(10, len(rewards) // 5))
    trailing = [rewards[max(0, i + 1 - window) : i + 1] for i in range(len(rewards))]
    smooth = [sum(values) / len(values) for values in trailing]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(rewards) + 1), rewards, "-", color="#9bc", label="per step")
    ax.plot(range(1, len(rewards) + 1), smooth, "-", color="#27c", label=f"mean of the last {window}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean training reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "grpo_reward.png", dpi=120)
    plt.close(fig)

    speed = summary["throughput"]
    traces = summary.get("teacher_traces")
    data = (f"the teacher's correct greedy solutions of {traces['kept']} of {traces['problems']} training problems "
            f"(its accuracy on them: {traces['teacher_train_accuracy']:.3f})" if traces else
            "the task's reference solutions")
    lines = [
        "# h1rl demo report", "",
        "Held-out accuracy (math-verify):", "",
        "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
        *["| " + " | ".join([label, *(f"{v:.3f}" for v in values)]) + " |" for label, values in rows], "",
        f"Distillation data: {data}.", "",
        f"Rollout throughput (4 prompts x G=8): hybrid {speed['hybrid_tok_s']:.0f} tok/s "
        f"(engine) vs teacher {speed['teacher_tok_s']:.0f} tok/s (generate): {speed['speedup']:.2f}x.", "",
        "| phase | seconds |", "|---|---|",
        *[f"| {k[:-2]} | {v:.0f} |" for k, v in summary["timings"].items()], "",
        "![accuracy](accuracy.png) ![distillation](distill_kl.png) ![GRPO reward](grpo_reward.png)", "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """`h1rl demo [--quick] [--config NAME|PATH] [--log_level L] [--key value ...]`; prints the summary table."""
    from h1rl.log import LOG_LEVELS, setup_logging
    from h1rl.recipes import find

    parser = argparse.ArgumentParser(
        prog="h1rl demo", description="distill-then-RL on the bundled teacher (CPU), from a recipe plus --key value "
        "overrides of any key below", epilog=keys_epilog(DemoConfig), allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="demo recipe: a bundled name or a YAML file (default: demo)")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (the demo_quick recipe)")
    parser.add_argument("--log_level", default="passive", choices=LOG_LEVELS,
                        help="passive (default): h1rl's progress at info, transformers as it is; other levels set both")
    args, rest = parser.parse_known_args(argv)
    setup_logging(args.log_level)
    try:
        path = find(args.config or ("demo_quick" if args.quick else "demo"), kind="demo")
        config = load_config(DemoConfig, path, flag_overrides(rest))
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        parser.exit(2, f"h1rl demo: error: {err}\n")
    print_summary(run_demo(config))  # the command's output
    return 0
