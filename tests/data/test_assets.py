"""The bundled assets: present, small, loadable offline, consistent with the code that built them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from h1rl.assets import ASSETS, held_out_path, teacher_dir, teacher_metrics_path, tokenizer_dir
from h1rl.data.arithmetic import ArithmeticTask, read_jsonl
from h1rl.data.tokenizer import CHAT_TEMPLATE, load_tokenizer, task_corpus, train_tokenizer

REPO = Path(__file__).resolve().parents[2]


def load_build_assets():
    spec = importlib.util.spec_from_file_location("build_assets", REPO / "scripts" / "build_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def metrics():
    return json.loads(teacher_metrics_path().read_text())


def test_bundle_is_small_and_complete(metrics):
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert size <= 20 * 2**20
    for path in (tokenizer_dir() / "tokenizer.json", teacher_dir() / "config.json",
                 teacher_dir() / "model.safetensors", teacher_dir() / "tokenizer.json", held_out_path()):
        assert path.is_file(), path
    greedy = metrics["greedy"]
    assert 0.0 < greedy["accuracy"] < 1.0 and greedy["num_problems"] == len(read_jsonl(held_out_path()))
    assert metrics["sampled"]["pass@1"] <= metrics["sampled"][f"pass@{metrics['sampled']['num_samples']}"]


def test_tokenizer_and_test_split_are_what_the_code_builds(metrics):
    bundled = load_tokenizer()
    assert bundled.chat_template == CHAT_TEMPLATE
    rebuilt = train_tokenizer(task_corpus(seed=metrics["teacher_config"]["seed"]))
    assert bundled.get_vocab() == rebuilt.get_vocab()
    cfg = metrics["teacher_config"]
    rows = read_jsonl(held_out_path())
    assert rows == ArithmeticTask(cfg["difficulty"], cfg["seed"]).generate(len(rows), "test")


def test_teacher_loads_offline_and_answers(metrics):
    from h1rl.eval import evaluate, load_model

    model, tokenizer = load_model(teacher_dir())
    assert type(model).__name__ == "MistralForCausalLM" and tokenizer.eos_token == "<|end|>"
    assert sum(p.numel() for p in model.parameters()) == metrics["parameters"]
    rows = read_jsonl(held_out_path())[:16]
    results = evaluate(model, rows, tokenizer)
    assert results["accuracy"] > 0.25 and results["no_answer"] == 0.0


def test_teacher_accuracy_matches_metrics(metrics):
    from h1rl.eval import evaluate

    results = evaluate(teacher_dir(), held_out_path(), seed=metrics["teacher_config"]["seed"])
    assert results["accuracy"] == pytest.approx(metrics["greedy"]["accuracy"], abs=0.01)


def test_build_assets_runs_and_is_reproducible(tmp_path):
    build = load_build_assets()
    cfg = build.TeacherConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              steps=3, batch_size=4, n_train=32, log_every=0)
    outs = []
    for name in ("a", "b"):
        metrics = build.build(tmp_path / name, cfg, n_test=4, sampled_n=2, sampled_problems=2)
        assert metrics["greedy"]["num_problems"] == 4 and "pass@2" in metrics["sampled"]
        outs.append(tmp_path / name)
    from safetensors.torch import load_file

    a, b = (load_file(o / "teacher" / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((outs[0] / "teacher" / "metrics.json").read_text())["teacher_config"]["steps"] == 3
