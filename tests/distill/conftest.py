"""Fixtures for the distillation tests: the bundled teacher with arithmetic chats on disk, and configs over them."""

from __future__ import annotations

import pytest
import torch
import yaml

from h1rl.assets import teacher_dir
from h1rl.config_io import load_config
from h1rl.data import ArithmeticTask, to_chat, write_jsonl
from h1rl.distill.config import DistillConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest, and least disturbed by a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> dict[str, str]:
    """The bundled teacher (4-layer Mistral, hidden 128, vocabulary 512) and chats of level-1 arithmetic problems
    with their solutions (34 to 51 tokens): train.jsonl (96, train split), calib.jsonl (16, test split)."""
    root = tmp_path_factory.mktemp("world")
    task = ArithmeticTask(1, seed=0)
    for name, rows in (("train", task.generate(96, "train")), ("calib", task.generate(16, "test"))):
        write_jsonl([{"messages": to_chat(r)} for r in rows], root / f"{name}.jsonl")
    return {"teacher": str(teacher_dir()), "train": str(root / "train.jsonl"), "calib": str(root / "calib.jsonl")}


@pytest.fixture
def make_config(toy_world, tmp_path):
    """`make_config(stages, overrides=(), out_dir=tmp_path / "run")`: a small DistillConfig over the toy world."""

    def make(stages: list[dict], overrides: list[str] = (), output_dir=None) -> DistillConfig:
        return load_config(DistillConfig, data=raw_config(toy_world, output_dir or tmp_path / "run", stages),
                           overrides=list(overrides))

    return make


def raw_config(toy: dict[str, str], output_dir, stages: list[dict]) -> dict:
    """The raw mapping of a small run over the bundled teacher (batch 8; loss chunks of 8 positions: 3 float32
    (8, 8, 512) temporaries of the vocabulary's 512 logits fit in 393216 bytes)."""
    return {
        "output_dir": str(output_dir),
        "model": {"teacher": toy["teacher"], "ssm_cfg": {"d_state": 16}},
        "data": {"dataset_name": toy["train"], "calibration_dataset_name": toy["calib"], "max_length": 64,
                 "calibration_samples": 16, "calibration_batch_size": 16},
        "loss": {"chunk_bytes": 393216},
        "importance": {"probe_steps": 4},
        "training": {"per_device_train_batch_size": 8, "learning_rate": 3e-4, "logging_steps": 5, "save_steps": 4,
                     "lr_scheduler_type": "constant", "save_total_limit": None},
        "stages": stages,
    }


@pytest.fixture
def write_recipe(toy_world, tmp_path):
    """`write_recipe(stages) -> path`: the small run's config as a YAML file (for the CLI)."""

    def write(stages: list[dict], output_dir=None):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw_config(toy_world, output_dir or tmp_path / "run", stages),
                                       sort_keys=False))
        return path

    return write
