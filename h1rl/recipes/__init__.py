"""The bundled recipes and launcher configs: shipped inside the package, read through `importlib.resources`.

    h1rl recipes                              # list them, with the first line of each
    h1rl recipes cp grpo_math .               # copy one to edit (./grpo_math.yaml)
    h1rl recipes path accelerate/zero3        # where the installed one is (for accelerate's --config_file)
    h1rl grpo --config grpo_math              # a recipe by name; --config path/to/recipe.yaml takes a file

What is here (names are paths in this folder without their suffix):

    demo, demo_quick, distill_tiny, grpo_math     recipes; `<command>_<what>` names the command that runs them
    deepspeed/{zero2,zero3,zero3_offload}         DeepSpeed JSON configs (batch-derived fields "auto"); a training
                                                  config's `deepspeed: zero3` names one of them
    accelerate/{zero2,zero3,zero3_offload}        accelerate configs for `accelerate launch --config_file`; their
                                                  `deepspeed_config_file: zero3` is resolved by h1rl to the JSON above
    launch/{hostfile,slurm_grpo}                  a DeepSpeed hostfile and a SLURM batch script (docs/multinode.md)
    models/<org>--<name>                          the config.json (only) of hub models the recipes name, for their
                                                  dry runs on machines without the model (h1rl.dry_run)

`find(name_or_path)` is the one lookup every command uses: an existing file wins, then a bundled name; anything else
is an error naming the closest bundled name.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import importlib.resources
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".yaml", ".json", ".sbatch", "")
_KINDS = {"deepspeed": "deepspeed config", "accelerate": "accelerate config", "launch": "launcher",
          "models": "model config"}
_files = contextlib.ExitStack()  # extracted copies, if the package is not on a plain filesystem (zip import)
atexit.register(_files.close)


@dataclass(frozen=True)
class Recipe:
    name: str  # e.g. "grpo_math", "deepspeed/zero3"
    kind: str  # the command that runs it (grpo, distill, demo) or what it is (deepspeed config, ...)
    path: Path  # the installed file
    description: str  # its first comment line, without the "#"


def _root():
    return importlib.resources.files(__name__)


def _as_path(resource) -> Path:
    if isinstance(resource, Path):
        return resource
    return _files.enter_context(importlib.resources.as_file(resource))


def list_recipes() -> list[Recipe]:
    """Every bundled recipe and launcher config, recipes first, then by folder and name."""
    out = []
    for folder in (None, *_KINDS):
        base = _root() if folder is None else _root() / folder
        for resource in sorted(base.iterdir(), key=lambda r: r.name):
            if not resource.is_file() or resource.name.startswith(("_", ".")) or resource.name.endswith(".py"):
                continue
            stem = resource.name.rsplit(".", 1)[0] if "." in resource.name else resource.name
            name = stem if folder is None else f"{folder}/{stem}"
            kind = stem.split("_")[0] if folder is None else _KINDS[folder]
            out.append(Recipe(name, kind, _as_path(resource), _describe(resource)))
    return out


def _describe(resource) -> str:
    """A recipe's first comment line (a JSON config: its ZeRO stage)."""
    text = resource.read_text()
    if resource.name.endswith(".json") and "model_type" in text:
        config = json.loads(text)
        return (f"{config['model_type']} config: {config['num_hidden_layers']} layers, hidden {config['hidden_size']} "
                "(no weights)")
    if resource.name.endswith(".json"):
        zero = json.loads(text).get("zero_optimization", {})
        offload = " with CPU offload" if "offload_param" in zero or "offload_optimizer" in zero else ""
        return f"DeepSpeed ZeRO-{zero.get('stage')}{offload}"
    lines = [line for line in text.splitlines() if line.startswith("#") and not line.startswith(("#!", "#SBATCH"))]
    return lines[0].lstrip("# ").strip() if lines else ""


def models_dir() -> Path:
    """The folder of the bundled model configs (`models/<org>--<name>.json`)."""
    return _as_path(_root() / "models")


def names() -> list[str]:
    return [r.name for r in list_recipes()]


def find(name_or_path: str | Path, kind: str | None = None) -> Path:
    """The file `name_or_path` names: an existing file, else a bundled recipe by name (`grpo_math`, `grpo_math.yaml`,
    `deepspeed/zero3`). `kind` (grpo, distill, demo): refuse a bundled recipe made for another command.
    FileNotFoundError naming the closest bundled names otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    for recipe in list_recipes():
        if text in (recipe.name, f"{recipe.name}{recipe.path.suffix}"):
            if kind is not None and recipe.kind != kind and recipe.kind in ("grpo", "distill", "demo"):
                raise ValueError(f"{text} is a recipe of `h1rl {recipe.kind}`, not of `h1rl {kind}`")
            return recipe.path
    close = difflib.get_close_matches(text, names(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise FileNotFoundError(f"{text} is neither a file nor a bundled recipe{hint} (`h1rl recipes` lists them)")


def copy(name: str, dest: str | Path) -> Path:
    """Copy the bundled recipe `name` into the folder `dest` (created if missing), or to the file path `dest`; returns
    the written path. Refuses to overwrite an existing file."""
    source = find_bundled(name)
    dest = Path(dest)
    target = dest / source.name if dest.is_dir() or str(dest).endswith(("/", "\\")) or not dest.suffix else dest
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or copy to another place")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def find_bundled(name: str) -> Path:
    """A bundled recipe by name only (never a file of the working directory)."""
    for recipe in list_recipes():
        if name in (recipe.name, f"{recipe.name}{recipe.path.suffix}"):
            return recipe.path
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise FileNotFoundError(f"no bundled recipe named {name}{hint} (`h1rl recipes` lists them)")


def main(argv: list[str] | None = None) -> int:
    """`h1rl recipes [cp NAME DIR | path NAME]`: printing is this command's job."""
    import argparse

    parser = argparse.ArgumentParser(prog="h1rl recipes", description="list, locate or copy the bundled recipes")
    sub = parser.add_subparsers(dest="action")
    p = sub.add_parser("cp", help="copy a bundled recipe to edit it")
    p.add_argument("name", help="e.g. grpo_math, accelerate/zero3")
    p.add_argument("dest", help="a folder (created if missing) or a file path")
    p = sub.add_parser("path", help="print the installed file of a bundled recipe")
    p.add_argument("name")
    sub.add_parser("ls", help="list them (the default)")
    args = parser.parse_args(argv)
    try:
        if args.action == "cp":
            print(copy(args.name, args.dest))
        elif args.action == "path":
            print(find_bundled(args.name))
        else:
            recipes = list_recipes()
            width = max(len(r.name) for r in recipes) + 2
            kinds = max(len(r.kind) for r in recipes) + 2
            for r in recipes:
                print(f"{r.name:<{width}}{r.kind:<{kinds}}{r.description}")
    except (FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"h1rl recipes: error: {err}\n")
    return 0
