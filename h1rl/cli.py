"""The `h1rl` command line: one subcommand per job, each a thin wrapper over the library function that does it.

    h1rl grpo --config grpo_math [--learning_rate 1e-5 --max_steps 5 ...]    (--help: every key, TRL's and h1rl's)
    h1rl distill --config distill_tiny [--stages.0.max_steps 10 ...]
    h1rl demo [--quick] [--config demo] [--out_dir runs/demo2 --grpo.max_steps 60 ...]
    h1rl eval --model DIR|HUB_NAME|bundled [--dataset_name FILE_OR_HUB_NAME] [--num_samples 8 ...]   (--help)
    h1rl convert --teacher DIR|HUB_NAME|bundled --layout t,m2,m2,t --output_dir DIR [--ssm-cfg JSON] [--dtype float32]
    h1rl recipes [cp NAME DIR | path NAME]     the bundled recipes and launcher configs
    h1rl env                                   the versions a bug report needs
    h1rl bench scan [--seq-lens 512 2048] [--batch 4] [--hidden 256] [--json FILE]
    h1rl bench rollout [--lengths 1024 2048 4096] [--out DIR]
    h1rl bench grpo [--new-tokens 256] [--repeats 2] [--length-chunks 4] ...      the same hybrid: h1rl vs TRL
    h1rl bench grpo --against-teacher [--caps 1024 2048 4096] [--resume]    the hybrid vs its teacher, per GRPO step
    h1rl bench grpo --partial-rollouts | --overlap-scoring                  (--help: every knob)
    h1rl bench memory --measure [--seq-lens 8192 32768] [--gpus N] [--json FILE]   (--help: every knob; without
                      --measure: the arithmetic table)

The training commands share one convention (`h1rl.flags`, docs/cli.md): a recipe by name or path, then `--key value`
for any key. Importing this module is cheap (`import h1rl` loads neither torch nor transformers), so `h1rl --help`
answers at once; each subcommand imports what it needs. Output: `h1rl recipes`, `h1rl env`, the benchmarks' tables and
`convert` print (that is their job); the training commands log (`h1rl.log`, `--log_level`).
"""

from __future__ import annotations

import argparse
import json
import sys


def _convert(args: argparse.Namespace) -> int:
    if args.old_out is not None or (args.output_dir is None and not args.dry_run):
        why = "--out was renamed --output_dir" if args.old_out is not None else "--output_dir is required"
        print(f"h1rl convert: error: {why}", file=sys.stderr)
        return 2
    from pathlib import Path

    from h1rl.assets import model_path
    from h1rl.log import setup_logging

    setup_logging()
    ssm_cfg = json.loads(args.ssm_cfg) if args.ssm_cfg else None
    if args.dry_run:  # the hybrid's config and size from the teacher's config; no weights (h1rl.dry_run)
        from h1rl.dry_run import convert_plan

        print(convert_plan(args.teacher, args.layout, ssm_cfg).text())
        return 0
    from h1rl.models.convert import convert_to_directory

    teacher = model_path(args.teacher)
    if not Path(teacher).is_dir():  # a hub name: its files, downloaded once into the Hugging Face cache
        from huggingface_hub import snapshot_download

        teacher = snapshot_download(teacher, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja"])
    out = convert_to_directory(teacher, args.layout, args.output_dir, ssm_cfg=ssm_cfg, dtype=args.dtype)
    print(f"hybrid checkpoint written to {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "scan":
        from h1rl.bench.scan_bench import run_scan_benchmark

        run_scan_benchmark(seq_lens=args.seq_lens, batch=args.batch, hidden=args.hidden, repeats=args.repeats,
                           json_path=args.json)
        return 0
    if args.what == "rollout":
        from h1rl.bench.rollout_bench import run_rollout_benchmark

        run_rollout_benchmark(lengths=args.lengths, hidden=args.hidden, layers=args.layers, batch=args.batch,
                              generations=args.generations, out_dir=args.out)
        return 0
    raise AssertionError(args.what)  # argparse restricts the choices


def _delegate(module: str, argv: list[str]) -> int:
    """Hand the rest of the command line to a subcommand module's own `main(argv)` (it owns its options)."""
    import importlib

    return importlib.import_module(module).main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h1rl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="turn a Llama/Mistral/Qwen2/Qwen3 teacher into a hybrid (Mamba-in-Llama init)")
    p.add_argument("--teacher", required=True,
                   help="a transformers checkpoint: a directory, a hub name, or `bundled` (the bundled tiny teacher)")
    p.add_argument("--layout", required=True, help="one code per layer, comma-separated: t (attention), m2, i")
    p.add_argument("--output_dir", default=None, help="required: the hybrid checkpoint's directory")
    p.add_argument("--out", dest="old_out", default=None, help=argparse.SUPPRESS)  # renamed --output_dir
    p.add_argument("--ssm-cfg", default=None, help='JSON overrides of ssm_cfg, e.g. \'{"d_state": 16}\'')
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dry-run", action="store_true", help="print the hybrid's size from the teacher's config only")
    p.set_defaults(func=_convert)

    p = sub.add_parser("bench", help="print speed measurements (side by side, one run)")
    p.add_argument("what", choices=["scan", "rollout", "grpo", "memory"], help="grpo and memory: their own options, "
                   "see `h1rl bench grpo --help`, `h1rl bench memory --help`")
    p.add_argument("--batch", type=int, default=4, help="sequences (scan) or distinct prompts (rollout)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048], help="scan: sequence lengths")
    p.add_argument("--repeats", type=int, default=3, help="scan: timed repeats (median)")
    p.add_argument("--json", default=None, help="scan: also write the figures to this JSON file")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="rollout: generated lengths")
    p.add_argument("--layers", type=int, default=8, help="rollout: layers of the teacher (half become m2)")
    p.add_argument("--generations", type=int, default=8, help="rollout: completions per prompt (G)")
    p.add_argument("--out", default="bench-rollout", help="rollout: folder for rollout.json and rollout.png")
    p.set_defaults(func=_bench)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # parsed by the module itself, see main()

    return parser


# Subcommands whose options belong to their own module's `main(argv)`.
DELEGATED = {
    "grpo": ("h1rl.rl.run", "GRPO on a hybrid from a YAML recipe (resumes from its last checkpoint)"),
    "distill": ("h1rl.distill.run", "staged distillation of a hybrid from its teacher (resumable)"),
    "demo": ("h1rl.demo", "distill-then-RL on the bundled teacher and task, on CPU (--quick: a smoke run)"),
    "eval": ("h1rl.eval", "accuracy and pass@k of a checkpoint with the math-verify reward"),
    "recipes": ("h1rl.recipes", "list the bundled recipes and launcher configs; `cp NAME DIR` copies one"),
    "env": ("h1rl.env", "print the versions a bug report needs"),
}


def main(argv: list[str] | None = None) -> int:
    from h1rl.distributed import strip_launcher_args

    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)  # the deepspeed launcher adds --local_rank
    if argv and argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    if argv[:2] in (["bench", "memory"], ["bench", "grpo"]):  # their options are their modules' own
        return _delegate(f"h1rl.bench.{'memory' if argv[1] == 'memory' else 'grpo_bench'}", argv[2:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
