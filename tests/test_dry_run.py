"""Dry runs of the real-model recipes (`h1rl.dry_run`): the model built on the meta device from the bundled config,
the data checked on the bundled GSM8K / MATH samples (answers extracted, verified, rendered by a chat template), the
plan's parameters, GPUs and memory per phase; no weights loaded, nothing downloaded."""

from __future__ import annotations

import os

import pytest

from h1rl.config_io import load_config
from h1rl.distill.config import DistillConfig
from h1rl.dry_run import convert_plan, distill_plan, grpo_plan, model_config, pop_flags, sample_dataset
from h1rl.recipes import find
from h1rl.rl.config import parse_grpo_args
from h1rl.rl.run import build_rewards

MATH = ["--dataset_name", "EleutherAI/hendrycks_math", "--dataset_config", "algebra", "--prompt_column", "problem",
        "--answer_column", "solution"]  # the override grpo_qwen3_1p7b's header gives for MATH


def recipe(name: str, *flags: str):
    """A GRPO recipe parsed as `h1rl grpo` parses it, and the rewards it names."""
    args = parse_grpo_args(["--config", name, *flags])
    return args, build_rewards(args.script.reward_funcs, args.script.reward_kwargs, args.script.answer_column)


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """A dry run may not load weights or reach the hub."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")


def test_configs_and_samples_are_found():
    config, source = model_config("Qwen/Qwen3-1.7B")
    assert config.model_type == "qwen3" and config.num_hidden_layers == 28 and "Qwen--Qwen3-1.7B.json" in source
    assert model_config("bundled")[0].model_type == "mistral"
    with pytest.raises(FileNotFoundError, match="h1rl bundles no config for it"):
        model_config("nobody/no-such-model")
    assert sample_dataset("openai/gsm8k")[0].name == "openai--gsm8k.jsonl"
    with pytest.raises(FileNotFoundError, match="h1rl bundles no sample of it"):
        sample_dataset("nobody/no-such-data")
    assert pop_flags(["--config", "x", "--dry-run", "--gpus", "16"]) == (True, {"gpus": 16}, ["--config", "x"])
    with pytest.raises(ValueError, match="options of --dry-run"):
        pop_flags(["--gpus", "8"])


def test_convert_dry_run():
    text = convert_plan("Qwen/Qwen3-1.7B", ",".join(["m2"] * 16 + ["t"] * 12)).text()
    assert "teacher: 1.721B parameters, 28 layers" in text and "16 m2 + 12 attention" in text


@pytest.mark.slow
def test_apriel_15b_on_16_gpus_matches_the_measured_memory():
    """GRPO of Apriel-H1-15B with ZeRO-3 on 2 x 8 GPUs: docs/multinode.md's measured figures (80 GB, T = 8k, N = 16:
    training 25.03 GiB, rollout 74.91 GiB with 48 slots) come back from the recipe's own settings."""
    plan = grpo_plan(*recipe("grpo_apriel_h1_15b"), gpus=16)
    text = plan.text()
    assert "15.69B parameters, 50 layers (30 m2, 20 attention)" in text
    assert "answers ['5', '\\\\frac{3}{4}', '9', '2, 3']" in text  # MATH's \boxed{} answers, verified
    totals = plan.totals()
    assert totals["training"] == pytest.approx(25.03, abs=0.05) and totals["rollout"] == pytest.approx(74.91, abs=0.1)
    assert plan.fewest == {"80 GB": 16, "141 GB": 8} and "at 16 GPUs: fits" in text
    assert "rollout: 48 rows decoded at once" in text


@pytest.mark.slow
@pytest.mark.parametrize("data, answers", [([], "['12', '315', '1500', '18.75']"),
                                           (MATH, "['5', '\\\\frac{3}{4}', '9', '2, 3']")])
def test_qwen3_grpo_on_gsm8k_and_math(data, answers):
    """Before the distillation ran: the model is distill_qwen3_1p7b's last stage; GSM8K's `#### N` and MATH's
    `\\boxed{}` answers are extracted from the bundled samples and verify."""
    plan = grpo_plan(*recipe("grpo_qwen3_1p7b", *data), gpus=8)
    text = plan.text()
    assert "stage 3 of the bundled recipe distill_qwen3_1p7b" in text and "(16 m2, 12 attention)" in text
    assert f"answers {answers}" in text and "chat template: a stand-in" in text
    assert plan.fewest["80 GB"] == 8 and all(t < 76 for t in plan.totals().values())


@pytest.mark.slow
def test_qwen3_distillation_plan():
    plan = distill_plan(load_config(DistillConfig, find("distill_qwen3_1p7b")))
    text = plan.text()
    assert "teacher: 1.72B parameters, 28 layers" in text
    assert "-> 12 m2 + 16 attention" in text and "-> 16 m2 + 12 attention" in text
    assert "openai--gsm8k.jsonl" in text and plan.gpus == 8 and plan.totals()["distillation"] < 76
