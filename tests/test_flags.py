"""h1rl.flags: the one command-line convention (`--config NAME|PATH` + `--key value`) of grpo, distill and demo."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from h1rl.config_io import ConfigError
from h1rl.flags import describe_keys, field_comments, flag_overrides, split_config


def test_flag_overrides():
    assert flag_overrides(["--a.b", "1", "--c=x=y", "--flag", "--d-e", "-2", "--stages.0", "{layers: [1]}"]) == [
        "a.b=1", "c=x=y", "flag=true", "d_e=-2", "stages.0={layers: [1]}"]
    with pytest.raises(ConfigError, match="unexpected argument 'a=1': give keys as --key value"):
        flag_overrides(["a=1"])
    assert split_config(["--x", "1", "--config", "r.yaml"]) == ("r.yaml", ["--x", "1"])
    assert split_config(["--config=r.yaml"]) == ("r.yaml", [])
    with pytest.raises(ConfigError, match="--config needs a recipe"):
        split_config(["--config"])


@dataclasses.dataclass
class Inner:
    # the block above a field
    # documents it too
    size: int = 4  # and the comment after it
    rate: float = dataclasses.field(default=0.1, metadata={"help": "metadata wins"})


@dataclasses.dataclass
class Outer:
    name: str  # required
    inner: Inner = dataclasses.field(default_factory=Inner)
    items: list[Inner] = dataclasses.field(default_factory=list)
    maybe: Inner | None = None


def test_describe_keys_lists_every_leaf_with_its_documentation():
    assert field_comments(Inner) == {"size": "the block above a field documents it too and the comment after it",
                                     "rate": ""}
    rows = {key: (kind, meaning) for key, kind, meaning in describe_keys(Outer)}
    assert list(rows) == ["name", "inner.size", "inner.rate", "items.N.size", "items.N.rate", "maybe.size",
                          "maybe.rate"]
    assert rows["name"] == ("str, required", "required")
    assert rows["inner.size"][0] == "int, default 4" and rows["inner.rate"][1] == "metadata wins"


def test_distill_help_lists_every_key():
    from h1rl.distill.config import DistillConfig

    proc = subprocess.run([sys.executable, "-m", "h1rl.cli", "distill", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for key, _, _ in describe_keys(DistillConfig):
        assert f"--{key}  (" in proc.stdout, key
    assert "reverse_kl: KL(student || teacher)" in proc.stdout  # a field's comment, as its meaning


def test_demo_rejects_an_unknown_grpo_key_naming_the_closest():
    from h1rl.demo import main

    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--grpo.learning_rat", "1e-4"])
    assert exit_.value.code == 2


def test_demo_grpo_section_is_checked_at_load(tmp_path):
    from h1rl.config_io import load_config
    from h1rl.demo import DemoConfig
    from h1rl.recipes import find

    with pytest.raises(ConfigError, match=r"grpo: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_config(DemoConfig, find("demo_quick"), ["grpo.learning_rat=1e-4"])
    cfg = load_config(DemoConfig, find("demo_quick"), ["grpo.learning_rate=3e-4", f"output_dir={tmp_path}"])
    assert cfg.grpo["learning_rate"] == 3e-4
