"""Package data: the bundled tokenizer, the tiny teacher checkpoint and the split it was measured on.

Everything here is written by `python scripts/build_assets.py` (deterministic from its seed; see that script):

    h1rl/assets/tokenizer/            the byte-level BPE of `h1rl.data.tokenizer`, with its chat template
    h1rl/assets/teacher/              a MistralForCausalLM checkpoint (safetensors) + the same tokenizer
    h1rl/assets/teacher/metrics.json  how it was built and its measured accuracy on the test split
    h1rl/assets/data/test.jsonl       that test split (rows: question, solution, answer, expression, num_ops)

and, written by hand for the recipes' dry runs (`h1rl.dry_run`): `h1rl/assets/data/samples/<org>--<name>.jsonl`, a few
rows in the columns and answer format of the hub dataset `org/name` (GSM8K's `#### N`, MATH's `\boxed{}`), written
for h1rl, not copied from the datasets.

The functions below give their paths, so nothing else hard-codes the layout. Wherever a command takes a model (a
directory or a hub name: `h1rl eval --model`, `h1rl convert --teacher`, a distillation's `model.teacher`), the name
`bundled` means the bundled teacher (`model_path`).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
BUNDLED = "bundled"  # the name of the bundled teacher wherever a model directory or hub name is taken


def tokenizer_dir() -> Path:
    return ASSETS / "tokenizer"


def teacher_dir() -> Path:
    return ASSETS / "teacher"


def held_out_path() -> Path:
    return ASSETS / "data" / "test.jsonl"


def samples_dir() -> Path:
    return ASSETS / "data" / "samples"


def teacher_metrics_path() -> Path:
    return teacher_dir() / "metrics.json"


def model_path(name_or_path: str | Path) -> str:
    """The bundled teacher's directory for `bundled`; any other directory or hub name as it is."""
    return str(teacher_dir()) if str(name_or_path) == BUNDLED else str(name_or_path)
