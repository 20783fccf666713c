"""Fixtures for the distillation tests: a tiny trained teacher world on disk, and configs over it."""

from __future__ import annotations

import pytest
import torch
import yaml

from h1rl.config_io import load_config
from h1rl.distill.config import DistillConfig
from h1rl.distill.toy import write_toy_world


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest, and least disturbed by a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> dict[str, str]:
    """Teacher (4-layer Mistral, hidden 64, briefly trained) + tokenizer, train.jsonl (96 chats), calib.jsonl (16)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return write_toy_world(tmp_path_factory.mktemp("toy"), steps=120, n_train=96, n_calib=16)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def make_config(toy_world, tmp_path):
    """`make_config(stages, overrides=(), out_dir=tmp_path / "run")`: a small DistillConfig over the toy world."""

    def make(stages: list[dict], overrides: list[str] = (), out_dir=None) -> DistillConfig:
        return load_config(DistillConfig, data=raw_config(toy_world, out_dir or tmp_path / "run", stages),
                           overrides=list(overrides))

    return make


def raw_config(toy: dict[str, str], out_dir, stages: list[dict]) -> dict:
    """The raw mapping of a small run over the toy world (batch 8; loss chunks of 8 positions: 3 float32 (8, 8, 56)
    temporaries of the toy vocabulary's 56 logits fit in 43008 bytes)."""
    return {
        "out_dir": str(out_dir),
        "model": {"teacher": toy["teacher"], "ssm_cfg": {"d_state": 16}},
        "data": {"path": toy["train"], "calibration_path": toy["calib"], "max_length": 48,
                 "calibration_samples": 16, "calibration_batch_size": 16},
        "loss": {"chunk_bytes": 43008},
        "importance": {"probe_steps": 4},
        "training": {"per_device_train_batch_size": 8, "learning_rate": 3e-4, "logging_steps": 5, "save_steps": 4,
                     "lr_scheduler_type": "constant", "save_total_limit": None},
        "stages": stages,
    }


@pytest.fixture
def write_recipe(toy_world, tmp_path):
    """`write_recipe(stages) -> path`: the small run's config as a YAML file (for the CLI)."""

    def write(stages: list[dict], out_dir=None):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw_config(toy_world, out_dir or tmp_path / "run", stages), sort_keys=False))
        return path

    return write
