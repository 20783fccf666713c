"""Build the bundled assets: tokenizer, tiny teacher checkpoint, its test split and measured accuracy.

    python scripts/build_assets.py                    # rewrites h1rl/assets/ (about 3 minutes on 2 CPU cores)
    python scripts/build_assets.py --out /tmp/assets --steps 50    # a quick trial run elsewhere

What it does, in order (all seeded from --seed; with the same --threads on the same CPU the output is identical):
1. trains the byte-level BPE tokenizer on the task (`h1rl.data.tokenizer`) -> OUT/tokenizer/;
2. draws the test split at the teacher's difficulty (`h1rl.data.arithmetic`) -> OUT/data/test.jsonl;
3. trains the teacher, a standard `MistralForCausalLM` (`h1rl.data.teacher.TeacherConfig`), on train-split problems
   only, and saves it in float32 safetensors with the tokenizer -> OUT/teacher/;
4. measures it with `h1rl.eval.evaluate` on the test split: greedy accuracy, and sampled accuracy and pass@k at
   temperature 1 -> OUT/teacher/metrics.json (also printed), with the build settings and timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from h1rl.data.arithmetic import ArithmeticTask, write_jsonl  # noqa: E402
from h1rl.data.teacher import TeacherConfig, build_teacher, train_teacher  # noqa: E402
from h1rl.data.tokenizer import task_corpus, train_tokenizer  # noqa: E402
from h1rl.eval import evaluate, format_table  # noqa: E402

MAX_BUNDLE_BYTES = 20 * 2**20


def build(out: Path, cfg: TeacherConfig, n_test: int, sampled_n: int, sampled_problems: int) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(task_corpus(seed=cfg.seed))
    tokenizer.save_pretrained(out / "tokenizer")
    test = ArithmeticTask(cfg.difficulty, cfg.seed).generate(n_test, "test")
    write_jsonl(test, out / "data" / "test.jsonl")

    teacher = build_teacher(tokenizer, cfg)
    t0 = time.perf_counter()
    losses = train_teacher(teacher, tokenizer, cfg)
    train_s = time.perf_counter() - t0
    teacher.save_pretrained(out / "teacher", safe_serialization=True)
    tokenizer.save_pretrained(out / "teacher")

    t0 = time.perf_counter()
    greedy = evaluate(teacher, test, tokenizer, num_samples=1, seed=cfg.seed)
    sampled = evaluate(teacher, test[:sampled_problems], tokenizer, num_samples=sampled_n, temperature=1.0,
                       pass_k=sorted({1, 2, 4, sampled_n} & set(range(1, sampled_n + 1))), seed=cfg.seed)
    eval_s = time.perf_counter() - t0
    print(format_table({"teacher (greedy)": greedy, "teacher (T=1)": sampled}))

    summary = lambda r: {k: v for k, v in r.items() if k not in ("problems", "config", "model", "data")}  # noqa: E731
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    metrics = {
        "description": "bundled tiny teacher for the arithmetic task; built by scripts/build_assets.py",
        "command": "python scripts/build_assets.py " + " ".join(
            f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in fields(cfg)
            if f.name in ("seed", "steps", "difficulty")) + f" --threads {torch.get_num_threads()}",
        "teacher_config": asdict(cfg),
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "dtype": "float32",
        "test_split": {"path": "data/test.jsonl", "problems": len(test), "difficulty": cfg.difficulty},
        "greedy": summary(greedy),
        "sampled": summary(sampled),
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "bundle_bytes": size,
    }
    (out / "teacher" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if size > MAX_BUNDLE_BYTES:
        raise SystemExit(f"build_assets: the assets take {size / 2**20:.1f} MiB, over the 20 MiB budget")
    return metrics


def main(argv: list[str] | None = None) -> int:
    defaults = TeacherConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "h1rl" / "assets"))
    parser.add_argument("--n-test", type=int, default=500, help="test problems (greedy accuracy)")
    parser.add_argument("--sampled-n", type=int, default=8, help="samples per problem at temperature 1")
    parser.add_argument("--sampled-problems", type=int, default=200, help="test problems for the sampled metrics")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (results are bitwise reproducible for a fixed thread count and CPU)")
    for f in fields(TeacherConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in fields(TeacherConfig)})
    metrics = build(Path(args.out), cfg, args.n_test, args.sampled_n, args.sampled_problems)
    print(json.dumps({k: metrics[k] for k in ("parameters", "greedy", "sampled", "build_seconds", "bundle_bytes")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
