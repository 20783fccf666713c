"""The command-line convention of every h1rl training command: a recipe plus `--key value` overrides.

    h1rl grpo --config grpo_math --learning_rate 1e-5 --max_steps 5       # flat keys: TRL's own parser
    h1rl distill --config distill_tiny --training.learning_rate 3e-4 --stages.0.max_steps 10
    h1rl demo --quick --out_dir runs/demo2 --grpo.max_steps 5

- `--config NAME|PATH`: a bundled recipe by name (`h1rl recipes` lists them) or a YAML file (`h1rl.recipes.find`);
- `--key value` (or `--key=value`) sets any key of the recipe; a flag alone sets true. Flat configs (`h1rl grpo`) are
  TRL's: `TrlParser` fills `GRPOConfig`-style dataclasses, as `trl grpo` and open-r1 do (`parse_flat`). Configs
  with sections (`h1rl distill`, `h1rl demo`) name a nested key with dots, a list item by its index, and the value is
  read as YAML (`--stages '[{layers: [1], max_steps: 5}]'`); `h1rl.config_io` builds them (`flag_overrides`);
- an unknown key, in the file or on the command line, is an error before anything is loaded, naming the key and the
  closest valid one; `--help` lists every key with its default and meaning;
- `--log_level` (TrainingArguments' levels) sets what h1rl logs (`h1rl.log`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from h1rl.config_io import ConfigError, closest, parse_yaml, to_dict


def split_config(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(`--config` value, the other arguments)."""
    rest, config, args = [], None, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ConfigError("--config needs a recipe name or a YAML file")
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config, rest


def read_recipe(name_or_path: str, kind: str) -> tuple[Path, dict[str, Any]]:
    """The recipe `name_or_path` (a bundled name or a file) for the command `kind`, as (path, top-level mapping)."""
    from h1rl.recipes import find

    try:
        path = find(name_or_path, kind=kind)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--config: {err}") from err
    try:
        raw = parse_yaml(path.read_text()) or {}
    except Exception as err:  # noqa: BLE001  (yaml's errors have no common public base with a useful message)
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return path, dict(raw)


# ---- flat configs, TRL's way -----------------------------------------------------------------------------------


def make_trl_parser(dataclass_types: Sequence[type], prog: str, description: str):
    """TRL's `TrlParser` over `dataclass_types`, without argparse's prefix matching (`--learning_rat` would otherwise
    mean `--learning_rate`), remembering the values it parsed (`inputs`: every field, as given, defaults included)."""
    from trl import TrlParser

    class Parser(TrlParser):
        inputs: dict[str, Any] = {}

        def parse_known_args(self, args=None, namespace=None):
            namespace, rest = super().parse_known_args(args, namespace)
            self.inputs = to_dict(vars(namespace))
            return namespace, rest

    return Parser(list(dataclass_types), prog=prog, description=description, allow_abbrev=False,
                  usage=f"{prog} [--config NAME|PATH] [--key value ...]   (--help: every key)")


def parse_flat(
    dataclass_types: Sequence[type],
    argv: Sequence[str] = (),
    *,
    prog: str,
    description: str,
    kind: str,
    mapping: Mapping[str, Any] | None = None,
    source: str = "<dict>",
) -> tuple[tuple, dict[str, Any]]:
    """Instances of `dataclass_types` from `--config RECIPE` (or `mapping`) plus `--key value` flags in `argv`, and the
    resolved inputs (every key, defaults included, as YAML-safe values: what `--config` reads back to the same run).

    Unknown keys, in the recipe or among the flags, are ConfigErrors naming the key and the closest valid one; a value
    that does not parse is argparse's error (exit 2); a dataclass's own validation error becomes a ConfigError naming
    the recipe. TRL's `env:` mapping in a recipe sets environment variables, as in `trl` recipes.
    """
    parser = make_trl_parser(dataclass_types, prog, description)
    config, argv = split_config(argv)
    if config is not None:
        if mapping is not None:
            raise ConfigError("--config: a mapping was given already")
        path, mapping = read_recipe(config, kind)
        source = str(path)
    mapping = dict(mapping or {})
    keys = {action.dest for action in parser._actions} - {"help"}
    renamed = renamed_keys(dataclass_types)
    for key in mapping:
        if key in renamed:
            raise ConfigError(f"{source}: key {key!r} was renamed {renamed[key]!r}")
        if key != "env" and key not in keys:
            raise ConfigError(f"{source}: unknown key {key!r}{closest(key, keys)}; `{prog} --help` lists every key")
    options = {s for action in parser._actions for s in action.option_strings}
    for arg in argv:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            if flag not in options and flag[2:].replace("-", "_") in renamed:
                raise ConfigError(f"{flag} was renamed --{renamed[flag[2:].replace('-', '_')]}")
            if flag not in options:
                raise ConfigError(f"unknown option {flag}{closest(flag, options)}; `{prog} --help` lists every key")
    env = mapping.pop("env", {}) or {}
    if not isinstance(env, Mapping):
        raise ConfigError(f"{source}: env: expected a mapping of environment variables, got {env!r}")
    for name, value in env.items():
        os.environ[str(name)] = str(value)
    parser.set_defaults_with_config(**mapping)
    try:
        parsed = parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)
    except ValueError as err:
        if "not used by the HfArgumentParser" in str(err):  # positional leftovers, e.g. the old key=value form
            raise ConfigError(f"{str(err).split(': ', 1)[-1]}: unexpected arguments; give overrides as --key value "
                              f"(e.g. --max_steps 5)") from err
        raise ConfigError(f"{source}: {err}") from err  # the dataclasses' own validation (__post_init__)
    except (TypeError, FileNotFoundError) as err:
        raise ConfigError(f"{source}: {err}") from err
    return tuple(parsed), parser.inputs


def renamed_keys(dataclass_types: Sequence[type]) -> dict[str, str]:
    """Old key -> new key, from each dataclass's `RENAMED` (a ClassVar): old names fail with a message naming the new
    one instead of "unknown key"."""
    return {old: new for cls in dataclass_types for old, new in getattr(cls, "RENAMED", {}).items()}


# ---- configs with sections (h1rl.config_io) ----------------------------------------------------------------------


def flag_overrides(argv: Sequence[str]) -> list[str]:
    """`--a.b value` / `--a.b=value` / `--flag` (true) as config_io overrides `a.b=value`; hyphens in keys are read as
    underscores, as TRL's parser does."""
    out, args = [], list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: give keys as --key value (e.g. --training.seed 1)")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            value = args.pop(0) if args and not args[0].startswith("--") else "true"
        out.append(f"{key.replace('-', '_')}={value}")
    return out


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type and default, meaning) of every key of the dataclass `cls`, nested ones included; a list of
    dataclasses is shown as `key.N.field`. The meaning is the field's `metadata["help"]`, else its source comment."""
    import typing

    hints = typing.get_type_hints(cls)
    docs = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or (typing.get_origin(tp) is not list and inner):
            out += describe_keys(tp if dataclasses.is_dataclass(tp) else inner[0], f"{key}.")
            continue
        if typing.get_origin(tp) is list and inner:
            out += describe_keys(inner[0], f"{key}.N.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        out.append((key, f"{name}, {default}", f.metadata.get("help") or docs.get(f.name, "")))
    return out


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comments that document it in `cls`'s source: the block right above it and the one after it
    on its line (h1rl's configs with sections document fields that way)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        out[node.target.id] = " ".join(above + trailing)
    return out


def keys_epilog(cls: type) -> str:
    """`--help`'s list of every key of `cls` (see `describe_keys`)."""
    rows = describe_keys(cls)
    import textwrap

    lines = ["keys (set in the recipe, or as --key value; nested keys with dots, list items by index):"]
    for key, kind, meaning in rows:
        lines.append(f"  --{key}  ({kind})")
        if meaning:
            lines.append(textwrap.fill(meaning, 116, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
