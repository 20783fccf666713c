"""`h1rl grpo`: recipe validation, dataset checks, and resume after SIGKILL reproducing an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from h1rl.config_io import ConfigError
from h1rl.rl.config import parse_grpo_args
from h1rl.rl.run import build_rewards, load_prompts, run_grpo

REPO = Path(__file__).resolve().parents[2]


def make_assets(root: Path) -> tuple[Path, Path]:
    """A tiny hybrid checkpoint with its tokenizer, and a jsonl of prompts with answers."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2"], vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"question": f"what is {i} + {i}", "answer": str(2 * i)} for i in range(16)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "model", data


def recipe(root: Path, model: Path, data: Path, out: Path, **keys) -> Path:
    """A flat GRPO recipe over the tiny assets (TRL's keys and h1rl's, as `h1rl grpo` reads them)."""
    cfg = {
        "model_name_or_path": str(model),
        "output_dir": str(out),
        "dataset_name": str(data), "prompt_column": "question", "answer_column": "answer",
        "reward_funcs": ["toy_rewards:distinct_tokens"],  # varies within every group
        "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8, "learning_rate": 0.01,
        "logging_steps": 1, "seed": 0, "beta": 0.0, "save_strategy": "steps", "save_steps": 1, **keys,
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_recipe_plus_flags(tmp_path):
    model, data = make_assets(tmp_path)
    path = recipe(tmp_path, model, data, tmp_path / "run", max_steps=3)
    args = parse_grpo_args(["--config", str(path), "--learning_rate", "1e-5", "--max_steps", "5", "--length_chunks",
                            "2", "--no_skip_zero_advantage_rows", "--use_peft", "--lora_r", "4"])
    assert args.training.learning_rate == 1e-5 and args.training.max_steps == 5  # flags win over the recipe
    assert args.training.num_generations == 4 and args.training.length_chunks == 2  # the recipe over the defaults
    assert args.training.skip_zero_advantage_rows is False and args.model.use_peft and args.model.lora_r == 4
    assert args.model.lora_target_modules == ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
    assert args.training.bf16 is False and args.training.use_cpu is True  # h1rl's defaults on a machine without CUDA
    assert args.script.dataset_name == str(data) and args.model.model_name_or_path == str(model)
    assert args.recipe["learning_rate"] == 1e-5 and args.recipe["num_generations"] == 4
    # the recipe as parsed reads back to the same run (what resolved_config.yaml is for)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(yaml.safe_dump(args.recipe))
    again = parse_grpo_args(["--config", str(saved)])
    assert again.recipe == args.recipe and again.training.to_dict() == args.training.to_dict()


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "1"], "unknown option --learning_rat (did you mean '--learning_rate'?)"),
    (["max_steps=5"], "['max_steps=5']: unexpected arguments; give overrides as --key value"),
    (["--reward_funcs", "acuracy"], "'acuracy' (did you mean 'accuracy'?) is neither a built-in reward"),
    (["--reward_kwargs", "{lenght: {max_length: 8}}"], "reward_kwargs: 'lenght' is not one of reward_funcs"),
    (["--dynamic_sampling_rounds", "-1"], "dynamic_sampling_rounds must be >= 0 (0 turns dynamic sampling off)"),
    (["--rollout_max_rows", "0"], "rollout_max_rows must be >= 1, or unset to size it by memory"),
    (["--use_vllm"], "use_vllm: h1rl generates with its own engine; remove use_vllm"),
    (["--importance_sampling_correction", "true", "--no_vllm_importance_sampling_correction"],
     "importance_sampling_correction=True contradicts vllm_importance_sampling_correction=False"),
    (["--deepspeed", "zero4"], "deepspeed: zero4 is neither a file nor one of the bundled configs"),
    (["--load_in_4bit"], "load_in_4bit / load_in_8bit: quantized hybrids are not supported"),
])
def test_bad_keys_and_values_are_named(tmp_path, argv, message):
    model, data = make_assets(tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_grpo_args(["--config", str(recipe(tmp_path, model, data, tmp_path / "run")), *argv])
    assert message in str(err.value)


def test_unknown_keys_fail_before_anything_loads(tmp_path):
    """A misspelt key in the recipe is reported before the (missing) dataset or model is touched, with the closest
    valid key; the same for a missing model path."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "/nope", "dataset_name": "/nope.jsonl", "output_dir": "x",
                                    "num_generation": 4}))
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'num_generation' \(did you mean 'num_generations'\?\)"):
        parse_grpo_args(["--config", str(path)])
    path.write_text(yaml.safe_dump({"dataset_name": "/nope.jsonl", "output_dir": "x"}))
    with pytest.raises(ConfigError, match="model_name_or_path: required"):
        parse_grpo_args(["--config", str(path)])


def test_cli_errors_and_help(tmp_path):
    model, data = make_assets(tmp_path)
    path = recipe(tmp_path, model, data, tmp_path / "run")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    bad = subprocess.run([sys.executable, "-m", "h1rl.cli", "grpo", "--config", str(path), "--lerning_rate", "1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "did you mean '--learning_rate'?" in bad.stderr
    assert not (tmp_path / "run").exists()  # nothing written
    helped = subprocess.run([sys.executable, "-m", "h1rl.cli", "grpo", "--help"], capture_output=True, text=True,
                            env=env)
    assert helped.returncode == 0
    from h1rl.rl.config import DATACLASSES

    fields = {f.name for cls in DATACLASSES for f in dataclasses.fields(cls) if f.init}
    listed = set(re.findall(r"^  --(\w+)", helped.stdout, flags=re.M))
    assert fields <= listed, sorted(fields - listed)  # --help lists every key, TRL's and h1rl's
    assert "DAPO's dynamic sampling" in helped.stdout


def test_missing_columns_are_named(tmp_path):
    model, data = make_assets(tmp_path)
    args = parse_grpo_args(["--config", str(recipe(tmp_path, model, data, tmp_path / "run")), "--answer_column",
                            "solution"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['solution'\] \(answer_column\); the dataset has "
                                         r"\['question', 'answer'\]"):
        load_prompts(args.script)


def test_prompts_become_chat_messages(tmp_path):
    model, data = make_assets(tmp_path)
    args = parse_grpo_args(["--config", str(recipe(tmp_path, model, data, tmp_path / "run")), "--system_prompt",
                            "be brief"])
    dataset = load_prompts(args.script)
    system, user = {"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 0 + 0"}
    assert dataset[0]["prompt"] == [system, user]
    assert dataset[3]["answer"] == "6"


def test_gsm8k_and_math_answers_are_extracted(tmp_path):
    """The answer column of the hub's math datasets holds a worked solution: GSM8K's ends in `#### N`, MATH's holds a
    `\\boxed{}`; the rewards get the answer alone (`answer_format`, default auto)."""
    model, _ = make_assets(tmp_path)
    rows = [{"question": "q1", "answer": "4 + 4 = <<4+4=8>>8 apples.\n#### 8"},
            {"question": "q2", "answer": "So $x = \\boxed{\\frac{1}{2}}$."}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = recipe(tmp_path, model, data, tmp_path / "run")
    assert load_prompts(parse_grpo_args(["--config", str(path)]).script)["answer"] == ["8", "\\frac{1}{2}"]
    with pytest.raises(ValueError, match=r"row 1: column 'answer' has no '#### N' answer \(answer_format gsm8k\)"):
        load_prompts(parse_grpo_args(["--config", str(path), "--answer_format", "gsm8k"]).script)


def test_resuming_with_a_changed_config_logs_the_changed_keys(tmp_path, caplog):
    """A complete run started again with another learning rate: the change is logged, nothing is loaded or trained."""
    model, data = make_assets(tmp_path)
    path = recipe(tmp_path, model, data, tmp_path / "run", max_steps=2)
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(parse_grpo_args(["--config", str(path)]).recipe))
    with caplog.at_level(logging.INFO, logger="h1rl"):
        assert run_grpo(parse_grpo_args(["--config", str(path), "--learning_rate", "0.02"])) is None
    assert "with a changed config: learning_rate" in caplog.text and "nothing to do" in caplog.text
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["learning_rate"] == 0.02


def run_cli(config: Path, *flags: str, kill_when: Path | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # toy_rewards
    proc = subprocess.Popen([sys.executable, "-m", "h1rl.cli", "grpo", "--config", str(config), *flags],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_when is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        return proc.returncode
    deadline = time.time() + 600
    while not (kill_when / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    model, data = make_assets(tmp_path)
    straight = recipe(tmp_path, model, data, tmp_path / "straight", max_steps=4)
    killed = recipe(tmp_path, model, data, tmp_path / "killed", max_steps=4)
    run_cli(straight)
    final = tmp_path / "straight" / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    run_cli(straight)  # a complete run, run again: nothing to do (transformers would train one step past max_steps)
    assert final.stat().st_mtime_ns == stamp and not (tmp_path / "straight" / "checkpoint-5").exists()
    assert run_cli(killed, kill_when=tmp_path / "killed" / "checkpoint-2") == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()
    first = tmp_path / "killed" / "checkpoint-1" / "trainer_state.json"
    stamp = first.stat().st_mtime_ns
    run_cli(killed)  # the same command again: resumes from checkpoint-2 (or later)
    assert first.stat().st_mtime_ns == stamp, "checkpoint-1 was rewritten: the run started over instead of resuming"
    state = json.loads((tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    original = load_file(model / "model.safetensors")
    assert any(not torch.equal(original[n], a[n]) for n in a)  # training did move the weights


def test_custom_rewards_by_import_path():
    funcs = build_rewards(
        ["h1rl.rewards:format_reward", "toy_rewards.distinct_tokens"],  # TRL's dotted form works too
        {"h1rl.rewards:format_reward": {"reasoning_tags": ["<r>", "</r>"]}},  # options: a factory called with them
        "answer",
    )
    assert funcs[1](completion_ids=[[1, 2, 2], [3]]) == [2.0, 1.0]
    assert funcs[0](completions=[r"<r> so </r> \boxed{4}", "4"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"reward_funcs: h1rl.nope:f: cannot import 'h1rl.nope:f'"):
        build_rewards(["h1rl.nope:f"])
    with pytest.raises(ValueError, match=r"reward_kwargs.length: .*unexpected keyword argument 'max_lenght'"):
        build_rewards(["length"], {"length": {"max_lenght": 3}})
