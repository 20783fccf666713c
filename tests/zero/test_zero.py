"""DeepSpeed ZeRO on CPU with 2 processes (gloo): GRPO under ZeRO-2, ZeRO-3 and plain DDP, distillation under ZeRO-2.

Each run is launched as a user would (`torchrun --nproc_per_node 2`, the recipe's `deepspeed: zero2|zero3`), and
checked: world size 2 as the trainer saw it; parameters identical on both ranks afterwards; the same parameters as a
single-process run with the same global batch (within float32 tolerance: same data, same rollouts, the loss
normalised over the global batch); and under ZeRO-3 the saved checkpoint loads with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from h1rl import recipes

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
WORKER = Path(__file__).with_name("worker.py")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


LAUNCHERS = {  # 2 processes on this machine, as docs/multinode.md launches them (the worker in place of h1rl.cli)
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port"],
    "deepspeed": ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"],
    "accelerate": ["-m", "accelerate.commands.launch", "--config_file", str(recipes.find("accelerate/zero2")),
                   "--num_processes", "2", "--main_process_port"],
}


def launch(mode: str, config: Path, report: Path, *flags: str, launcher: str = "torchrun") -> list[dict]:
    """2 processes of the worker; returns the two ranks' reports (their parameters under `params`)."""
    cmd = [sys.executable, *LAUNCHERS[launcher], str(free_port()), str(WORKER), mode, str(config), str(report),
           *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    ranks = []
    for r in range(2):
        info = json.loads((report / f"rank{r}.json").read_text())
        info["params"] = torch.load(report / f"rank{r}.pt")
        ranks.append(info)
    return ranks


def single(mode: str, config: Path, *flags: str) -> None:
    """The same recipe in one process, through the command line."""
    cmd = [sys.executable, "-m", "h1rl.cli", mode, "--config", str(config), *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]


def check_ranks(ranks: list[dict], reference: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                kind: str = "DEEPSPEED") -> None:
    """World size 2 on both ranks, identical parameters on both, equal to the 1-process `reference` (which trained
    away from `start`, compared on the names they share) within float32 tolerance."""
    for info in ranks:
        assert info["num_processes"] == 2 and info["torch_world_size"] == 2, info
        assert kind in info["distributed_type"], info
    assert sorted(info["process_index"] for info in ranks) == [0, 1]
    a, b = ranks[0]["params"], ranks[1]["params"]
    assert a.keys() == b.keys() == reference.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between the ranks"
    moved = max((reference[n] - start[n]).abs().max().item() for n in reference.keys() & start.keys())
    assert moved > 1e-3, "the reference run did not train"
    for name in reference:
        gap = (a[name] - reference[name]).abs().max().item()
        assert gap <= 1e-5 * moved, f"{name}: 2 processes vs 1 differ by {gap} (training moved weights by {moved})"


def hf_params(directory: Path) -> dict[str, torch.Tensor]:
    """A saved checkpoint's parameters under the model's own names (tied weights included), loaded the HF way."""
    from transformers import AutoModelForCausalLM

    import h1rl  # noqa: F401  (Auto classes)

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------- GRPO


def grpo_world(root: Path) -> tuple[Path, Path]:
    """A tiny hybrid checkpoint + tokenizer and a prompt file; the recipe over them (global batch 8 = 2 prompts x 4)."""
    sys.path.insert(0, str(TESTS))
    from conftest import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer))
    # the digits stop a completion too: lengths spread, so the training pass splits rows by length (length_chunks)
    # and the processes must agree on how many forwards they run (DDP and ZeRO-3 hang otherwise)
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *digits]
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"question": f"what is {i} + {i}", "answer": str(2 * i)} for i in range(16)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # SGD: updates linear in the gradient, so "equal within float32" is tight (2 processes vs 1 measured ~1e-6 of the
    # update); Adam divides by sqrt(v) and turns last-bit gradient noise on near-zero gradients into ~1e-3 of it
    recipe = {
        "model_name_or_path": str(root / "model"),
        "output_dir": str(root / "unset"),
        "dataset_name": str(root / "data.jsonl"), "prompt_column": "question", "answer_column": "answer",
        "reward_funcs": ["toy_rewards:distinct_tokens"],
        "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8, "learning_rate": 0.5,
        "optim": "sgd", "max_steps": 3, "logging_steps": 1, "seed": 0, "beta": 0.0, "save_strategy": "no",
        "temperature": 1.0,
    }
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, root / "model"


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    recipe, model = grpo_world(root)
    single("grpo", recipe, "--output_dir", str(root / "single"))
    reference = load_file(root / "single" / "final" / "model.safetensors")
    return root, recipe, reference, load_file(model / "model.safetensors")


@pytest.mark.parametrize("stage", ["zero2", "zero3", "ddp"])
def test_grpo_two_processes_match_one(grpo_reference, stage):
    root, recipe, reference, start = grpo_reference
    out = root / stage
    deepspeed = [] if stage == "ddp" else ["--deepspeed", stage]  # ddp: plain data parallel over gloo
    ranks = launch("grpo", recipe, root / f"{stage}_report", "--output_dir", str(out), *deepspeed,
                   "--per_device_train_batch_size", "4")  # 2 processes x 4 = the reference's global batch of 8
    check_ranks(ranks, reference, start, kind="MULTI_CPU" if stage == "ddp" else "DEEPSPEED")
    saved = hf_params(out / "final")  # written by save_model: under ZeRO-3 the 16-bit weights are gathered on save
    for name, value in saved.items():
        assert torch.allclose(value, ranks[0]["params"][name], atol=1e-6), name


@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_other_launchers_give_the_same_run(grpo_reference, launcher):
    """`deepspeed` (which adds --local_rank to the command line) and `accelerate launch` with the bundled ZeRO-2
    accelerate config (DeepSpeed enabled by the launcher, not the recipe) train exactly like torchrun."""
    root, recipe, reference, start = grpo_reference
    extra = [] if launcher == "accelerate" else ["--deepspeed", "zero2"]
    ranks = launch("grpo", recipe, root / f"{launcher}_report", "--output_dir", str(root / launcher), *extra,
                   "--per_device_train_batch_size", "4", launcher=launcher)
    check_ranks(ranks, reference, start)


def test_grpo_with_a_reference_model_under_zero3(grpo_reference):
    """beta > 0 (TRL loads a reference model from the checkpoint) and gradient accumulation (TRL computes the
    reference log-probs in forwards of batch_size rows): both processes run equally many forwards whatever their
    completion lengths (unequal counts hung ZeRO-3's parameter gathers), and the run equals one process."""
    root, recipe, _, start = grpo_reference
    settings = ["--beta", "0.04", "--gradient_accumulation_steps", "2"]
    single("grpo", recipe, "--output_dir", str(root / "kl_single"), *settings)
    reference = load_file(root / "kl_single" / "final" / "model.safetensors")
    ranks = launch("grpo", recipe, root / "kl_report", "--output_dir", str(root / "kl_zero3"), "--deepspeed", "zero3",
                   "--per_device_train_batch_size", "4", *settings)
    check_ranks(ranks, reference, start)
    assert any(e.get("kl", 0.0) > 0 for e in ranks[0]["log_history"])


def test_dynamic_sampling_with_two_processes(grpo_reference):
    """Each process refills its own tied groups; both run the same rounds (TRL gathers across them) and stay equal."""
    root, recipe, _, start = grpo_reference
    ranks = launch("grpo", recipe, root / "dynamic_report", "--output_dir", str(root / "dynamic"),
                   "--reward_funcs", "toy_rewards:rare_first_token", "--dynamic_sampling_rounds", "2",
                   "--max_steps", "4", "--per_device_train_batch_size", "8")  # 2 whole groups of 4 per process
    for info in ranks:
        assert info["num_processes"] == 2 and info["torch_world_size"] == 2, info
    a, b = ranks[0]["params"], ranks[1]["params"]
    assert all(torch.equal(a[n], b[n]) for n in a), "the ranks diverged"
    assert any(not torch.equal(a[n], start[n]) for n in start)
    logs = [e for e in ranks[0]["log_history"] if "dynamic_sampling/tied_groups" in e]
    assert len(logs) == 4
    assert sum(e["dynamic_sampling/tied_groups"] for e in logs) > 0  # the reward ties often: refills happened
    assert sum(e["dynamic_sampling/extra_rounds"] for e in logs) > 0
    assert all(e["dynamic_sampling/extra_rounds"] <= 2 for e in logs)


def test_grpo_zero3_without_gathering_the_weights_for_generation(grpo_reference):
    """`ds3_gather_for_generation: false`: the rollout runs with ZeRO-3's hooks active and the two processes' rows
    stop at different steps (digits stop a completion); every process keeps making model calls until both are done
    (synced decoding), and the run equals one process."""
    root, recipe, reference, start = grpo_reference
    ranks = launch("grpo", recipe, root / "nogather_report", "--output_dir", str(root / "nogather"), "--deepspeed",
                   "zero3", "--ds3_gather_for_generation", "false", "--per_device_train_batch_size", "4")
    check_ranks(ranks, reference, start)


DATA_WORKER = Path(__file__).with_name("data_worker.py")


@pytest.mark.parametrize("stage", ["zero3", "zero2", "ddp"])
def test_processes_with_different_data_stay_in_step(tmp_path, stage):
    """Rank 0 holds rows that share their prompts, rank 1 all-distinct ones: the shared-prefix training step and the
    no-grad (reference) forward call the same modules on both; under ZeRO-3 a rollout with partitioned weights where
    rank 0's rows stop at their first token and rank 1's run to the cap finishes, and equals the gathered rollout."""
    cmd = [sys.executable, *LAUNCHERS["torchrun"], str(free_port()), str(DATA_WORKER), stage, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reference_sum"]])).all() for r in ranks)
    if stage == "zero3":
        first, second = ranks
        assert first["partitioned"] == first["gathered"] and all(len(c) == 1 for c in first["partitioned"])
        assert second["partitioned"] == second["gathered"] and all(len(c) == 6 for c in second["partitioned"])


# -------------------------------------------------------------------------------------------------- distillation


def test_distillation_zero2_two_processes_match_one(tmp_path):
    from h1rl.assets import teacher_dir
    from h1rl.data import ArithmeticTask, to_chat, write_jsonl

    torch.set_num_threads(1)
    task = ArithmeticTask(1, seed=0)  # the bundled teacher on short arithmetic chats
    chats = {split: [{"messages": to_chat(r)} for r in task.generate(n, split)] for split, n in (("train", 64),
                                                                                                    ("test", 16))}
    toy = {"teacher": str(teacher_dir()), "train": write_jsonl(chats["train"], tmp_path / "train.jsonl"),
           "calib": write_jsonl(chats["test"], tmp_path / "calib.jsonl")}
    recipe = {
        "output_dir": str(tmp_path / "unset"),
        "model": {"teacher": toy["teacher"], "ssm_cfg": {"d_state": 16}},
        "data": {"dataset_name": str(toy["train"]), "calibration_dataset_name": str(toy["calib"]), "max_length": 64,
                 "calibration_samples": 16, "calibration_batch_size": 16},
        "loss": {"chunk_size": 16, "ce_weight": 0.5},
        "training": {"per_device_train_batch_size": 8, "learning_rate": 0.2, "logging_steps": 1, "save_steps": 100,
                     "lr_scheduler_type": "constant", "trainer_args": {"optim": "sgd"}},  # SGD: see grpo_world
        "stages": [{"layers": [1, 3], "max_steps": 3}],
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    single("distill", path, "--output_dir", str(tmp_path / "single"))
    reference = hf_params(tmp_path / "single" / "stage_1" / "final")
    ranks = launch("distill", path, tmp_path / "report", "--output_dir", str(tmp_path / "zero2"),  # 2 processes
                   "--training.deepspeed", "zero2", "--training.per_device_train_batch_size", "4")  # x 4 = the batch
    check_ranks(ranks, reference, start=hf_params(Path(toy["teacher"])))  # attention layers start as the teacher's
    saved = hf_params(tmp_path / "zero2" / "stage_1" / "final")
    for name, value in saved.items():
        assert torch.allclose(value, ranks[0]["params"][name], atol=1e-6), name
