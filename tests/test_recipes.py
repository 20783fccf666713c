"""Every recipe YAML loads into its typed config, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from h1rl.config_io import load_config
from h1rl.demo import DemoConfig
from h1rl.distill.config import DistillConfig
from h1rl.rl.config import GRPORunConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
CONFIGS = {"distill": DistillConfig, "grpo": GRPORunConfig, "demo": DemoConfig}


def test_there_are_recipes():
    assert {p.stem.split("_")[0] for p in RECIPES} >= set(CONFIGS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_into_its_config(path):
    kind = path.stem.split("_")[0]
    assert kind in CONFIGS, f"{path.name}: name recipes <kind>_<what>.yaml with kind in {sorted(CONFIGS)}"
    load_config(CONFIGS[kind], path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} should start with a comment giving the command that runs it"
    assert f"h1rl {kind}" in path.read_text().split("\n\n")[0] or "python -m" in path.read_text().split("\n\n")[0]
