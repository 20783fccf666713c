"""`h1rl grpo`: recipe validation, dataset checks, and resume after SIGKILL reproducing an uninterrupted run."""

from __future__ import annotations

import json
import os
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

from h1rl.config_io import ConfigError, load_config
from h1rl.rl.config import GRPORunConfig
from h1rl.rl.run import last_complete_checkpoint, load_prompts

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


def recipe(root: Path, model: Path, data: Path, out: Path, **trl) -> Path:
    cfg = {
        "model": str(model),
        "output_dir": str(out),
        "data": {"path": str(data), "prompt_column": "question", "answer_column": "answer"},
        "rewards": [{"name": "toy_rewards:distinct_tokens", "weight": 1.0}],  # varies within every group
        "trl": {"per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8,
                "learning_rate": 0.01, "logging_steps": 1, "seed": 0, "beta": 0.0, "save_strategy": "steps",
                "save_steps": 1, **trl},
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_unknown_keys_and_missing_columns_are_named(tmp_path):
    model, data = make_assets(tmp_path)
    path = recipe(tmp_path, model, data, tmp_path / "run")
    with pytest.raises(ConfigError, match="data.promt_column"):
        load_config(GRPORunConfig, path, ["data.promt_column=x"])
    cfg = load_config(GRPORunConfig, path, ["data.answer_column=solution"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['solution'\].*\['question', 'answer'\]"):
        load_prompts(cfg.data)
    with pytest.raises(ValueError, match="trl.output_dir"):
        load_config(GRPORunConfig, path, ["trl.output_dir=/tmp/x"])


def test_prompts_become_chat_messages(tmp_path):
    model, data = make_assets(tmp_path)
    cfg = load_config(GRPORunConfig, recipe(tmp_path, model, data, tmp_path / "run"), ["data.system_prompt=be brief"])
    dataset = load_prompts(cfg.data)
    system, user = {"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 0 + 0"}
    assert dataset[0]["prompt"] == [system, user]
    assert dataset[3]["answer"] == "6"


def test_incomplete_checkpoints_are_skipped(tmp_path):
    for step, state in ((1, "{}"), (2, "{}"), (3, '{"trunc')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-4").mkdir()  # killed before trainer_state.json
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"


def run_cli(config: Path, *overrides: str, kill_when: Path | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # toy_rewards
    proc = subprocess.Popen([sys.executable, "-m", "h1rl.cli", "grpo", "--config", str(config), *overrides],
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
    from h1rl.rl.config import RewardSpec
    from h1rl.rl.run import build_rewards

    funcs, weights = build_rewards(
        [RewardSpec("h1rl.rewards:format_reward", 0.5, {"reasoning_tags": ["<r>", "</r>"]}),  # a factory + options
         RewardSpec("toy_rewards:distinct_tokens", 2.0)],  # a reward function itself
        "answer",
    )
    assert weights == [0.5, 2.0]
    assert funcs[1](completion_ids=[[1, 2, 2], [3]]) == [2.0, 1.0]
    assert funcs[0](completions=[r"<r> so </r> \boxed{4}", "4"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="neither a built-in reward"):
        RewardSpec("my_reward")
    with pytest.raises(ConfigError, match=r"rewards.0.name: cannot import 'h1rl.nope:f'"):
        build_rewards([RewardSpec("h1rl.nope:f")], "answer")
