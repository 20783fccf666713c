"""The bundled recipes: every one loads into its typed config and starts with the command that runs it; lookup by
name or path; `h1rl recipes` lists, locates and copies them; the launcher configs point at files that exist."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from h1rl import recipes
from h1rl.config_io import load_config
from h1rl.demo import DemoConfig
from h1rl.distill.config import DistillConfig
from h1rl.rl.config import parse_grpo_args

CONFIGS = {"distill": DistillConfig, "demo": DemoConfig}
RECIPES = [r for r in recipes.list_recipes() if r.kind in ("grpo", *CONFIGS)]


def test_there_are_recipes_and_launcher_configs():
    assert {r.kind for r in RECIPES} == {"grpo", "distill", "demo"}
    names = recipes.names()
    for name in ("deepspeed/zero2", "deepspeed/zero3", "deepspeed/zero3_offload", "accelerate/zero2",
                 "accelerate/zero3", "accelerate/zero3_offload", "launch/hostfile", "launch/slurm_grpo"):
        assert name in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_loads_into_its_config(recipe):
    if recipe.kind == "grpo":  # flat, TRL's way: the three dataclasses of h1rl.rl.config
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        parse_grpo_args(["--config", recipe.name])
        unset_hf_deepspeed_config()  # a ZeRO-3 recipe arms zero.Init for the models later tests build
    else:
        load_config(CONFIGS[recipe.kind], recipe.path)
    text = recipe.path.read_text()
    assert text.startswith("#"), f"{recipe.name} should start with a comment giving the command that runs it"
    assert f"h1rl {recipe.kind}" in text.split("\n\n")[0] or "python -m" in text.split("\n\n")[0]


@pytest.mark.parametrize("name", ["accelerate/zero2", "accelerate/zero3", "accelerate/zero3_offload"])
def test_accelerate_configs_name_a_bundled_deepspeed_config(name):
    from h1rl.distributed import deepspeed_config_path

    config = yaml.safe_load(recipes.find(name).read_text())
    file = config["deepspeed_config"]["deepspeed_config_file"]
    assert file == name.split("/")[1]  # a bundled short name, resolved by h1rl wherever the package is installed
    zero = json.loads(open(deepspeed_config_path(file)).read())["zero_optimization"]
    assert zero["stage"] == (2 if file == "zero2" else 3)
    assert config["deepspeed_config"]["zero3_init_flag"] == (zero["stage"] == 3)


def test_accelerate_short_name_is_resolved_before_training(monkeypatch):
    from h1rl.distributed import prepare_training_kwargs

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "zero3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert prepare_training_kwargs(None) == {}
    import os

    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(recipes.find("deepspeed/zero3"))


def test_find_by_name_or_path(tmp_path, monkeypatch):
    bundled = recipes.find("grpo_math")
    assert bundled == recipes.find("grpo_math.yaml") and bundled.is_file()
    assert recipes.find("deepspeed/zero3").suffix == ".json"
    mine = tmp_path / "grpo_math.yaml"
    mine.write_text("# mine\n")
    monkeypatch.chdir(tmp_path)
    assert recipes.find("grpo_math.yaml") == mine.relative_to(tmp_path)  # an existing file wins over the name
    assert recipes.find("grpo_math") == bundled
    with pytest.raises(FileNotFoundError, match="did you mean grpo_math"):
        recipes.find("grpo_mat")
    with pytest.raises(ValueError, match="distill_tiny is a recipe of `h1rl distill`, not of `h1rl grpo`"):
        recipes.find("distill_tiny", kind="grpo")


def test_copy(tmp_path):
    written = recipes.copy("grpo_math", tmp_path / "new")
    assert written == tmp_path / "new" / "grpo_math.yaml"
    assert written.read_text() == recipes.find("grpo_math").read_text()
    with pytest.raises(FileExistsError):
        recipes.copy("grpo_math", tmp_path / "new")
    assert recipes.copy("launch/hostfile", tmp_path / "hosts.txt") == tmp_path / "hosts.txt"


def test_cli(tmp_path):
    def h1rl(*args):
        return subprocess.run([sys.executable, "-m", "h1rl.cli", "recipes", *args], capture_output=True, text=True,
                              cwd=tmp_path)

    listing = h1rl()
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == len(recipes.list_recipes())
    assert any(line.split()[:2] == ["grpo_math", "grpo"] for line in lines)
    assert any(line.split()[:3] == ["deepspeed/zero3", "deepspeed", "config"] for line in lines)
    copied = h1rl("cp", "accelerate/zero3", ".")
    assert copied.returncode == 0 and (tmp_path / "zero3.yaml").is_file(), copied.stderr
    assert h1rl("path", "distill_tiny").stdout.strip() == str(recipes.find("distill_tiny"))
    missing = h1rl("cp", "grpo_maths", ".")
    assert missing.returncode == 2 and "did you mean grpo_math" in missing.stderr
