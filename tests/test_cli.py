"""The command line's plumbing: a cheap `import h1rl` (lazy Auto registration), `h1rl --help` fast, `h1rl env`,
rank-aware logging, and no bare `print` in library code."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_import_h1rl_and_the_cli_load_neither_torch_nor_transformers():
    out = python("import sys, h1rl, h1rl.cli; print(sorted(m for m in ('torch', 'transformers', 'trl', 'h1rl.models') "
                 "if m in sys.modules))").stdout
    assert out.strip() == "[]"


def test_help_is_fast():
    """`h1rl --help` under a second (it was ~4-6 s when `import h1rl` loaded torch); best of three runs."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "h1rl.cli", "--help"], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0 and "recipes" in proc.stdout and "env" in proc.stdout
    assert min(times) < 1.0, times


@pytest.mark.parametrize("first", ["h1rl", "transformers"])
def test_import_h1rl_registers_the_auto_classes(tmp_path, first):
    """`import h1rl` then the Auto classes load an h1rl checkpoint (and the other import order too); the hook imports
    `h1rl.models` only when an h1rl model type is looked up."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_model

    tiny_model(["t", "m2"]).save_pretrained(tmp_path / "hybrid")
    imports = "import h1rl; import transformers.models.auto" if first == "h1rl" else \
        "import transformers.models.auto; from transformers import AutoConfig; import h1rl"
    out = python(f"""{imports}
import sys
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig
assert "h1rl.models" not in sys.modules
assert "llama" in __import__("transformers").models.auto.configuration_auto.CONFIG_MAPPING
assert "h1rl.models" not in sys.modules  # other model types leave h1rl alone
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hybrid')!r})
print(type(model).__module__, type(AutoConfig.for_model("apriel_hybrid_ssm")).__name__)
""").stdout.split()
    assert out == ["h1rl.models.modeling", "AprielHybridSSMConfig"]


def test_h1rl_attributes_are_lazy():
    import h1rl
    from h1rl.models import HybridConfig

    assert h1rl.HybridConfig is HybridConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        h1rl.nope  # noqa: B018


def test_model_types_of_the_hook_are_the_registered_ones():
    from h1rl._auto import MODEL_TYPES
    from h1rl.models import AprielHybridSSMConfig, AprielSSMThinkerHybridConfig, HybridConfig

    assert set(MODEL_TYPES) == {c.model_type for c in (HybridConfig, AprielHybridSSMConfig,
                                                       AprielSSMThinkerHybridConfig)}


def test_env_prints_the_versions_a_bug_report_needs():
    proc = subprocess.run([sys.executable, "-m", "h1rl.cli", "env"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line[2:].split(":", 1) for line in proc.stdout.splitlines() if line.startswith("- "))
    lines = {k: v.strip() for k, v in lines.items()}
    for name in ("transformers", "trl", "peft", "deepspeed", "accelerate", "datasets", "math-verify", "torch"):
        assert lines[name].startswith(version(name).split("+")[0]), (name, lines[name])
    assert lines["mamba-ssm"] and lines["causal-conv1d"] and lines["Python"] == ".".join(map(str, sys.version_info[:3]))
    assert lines["h1rl"].startswith("0.1.0") and "CUDA (torch build)" in lines and "accelerators" in lines


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_logging_is_rank_aware(monkeypatch, capsys, rank, shown):
    from h1rl.log import setup_logging

    monkeypatch.setenv("RANK", rank)
    level = setup_logging("info")
    assert level == (logging.INFO if shown else logging.WARNING)
    logging.getLogger("h1rl.some.module").info("progress %d", 7)
    logging.getLogger("h1rl.some.module").warning("trouble")
    err = capsys.readouterr().err
    assert ("progress 7" in err) == shown and "trouble" in err
    with pytest.raises(ValueError, match="log_level: expected one of"):
        setup_logging("verbose")


PRINTING = ("main", "benchmark")  # functions whose job is printing (a command's output, a benchmark's table)


def prints(node: ast.AST, function: str | None = None):
    """(line, enclosing function) of every `print(...)` call under `node`."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        function = node.name
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
        yield node.lineno, function
    for child in ast.iter_child_nodes(node):
        yield from prints(child, function)


def test_library_code_does_not_print():
    """Library code logs (h1rl.log); `print` only in a command's `main`, a `print_*` function, benchmarks and
    cli.py's handlers."""
    offenders = []
    for path in sorted((REPO / "h1rl").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("h1rl/bench/") or rel == "h1rl/cli.py":
            continue
        offenders += [f"{rel}:{line} in {function}" for line, function in prints(ast.parse(path.read_text()))
                      if not (function in PRINTING or (function or "").startswith("print_"))]
    assert not offenders, offenders


def test_rank_comes_from_the_launcher(monkeypatch):
    from h1rl.log import is_main_process

    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "3")
    assert not is_main_process()
    assert os.environ["RANK"] == "3"


@pytest.mark.parametrize("argv, called, expected", [
    ([], "run_grpo_benchmark", {"new_tokens": 256, "steps": 2, "hidden": 256, "vocab": 512, "length_chunks": 4}),
    (["--new-tokens", "64", "--length-chunks", "1", "--repeats", "3"], "run_grpo_benchmark",
     {"new_tokens": 64, "length_chunks": 1, "steps": 3}),
    (["--against-teacher", "--caps", "1024", "--resume"], "run_against_teacher",
     {"caps": (1024,), "steps": 1, "hidden": 512, "vocab": 32000, "resume": True}),
    (["--partial-rollouts", "--caps", "2048", "--partial-budget", "256"], "run_partial_rollouts_benchmark",
     {"cap": 2048, "budget": 256, "steps": 4, "hidden": 512, "vocab": 32000}),
    (["--overlap-scoring", "--repeats", "2"], "run_overlap_benchmark", {"steps": 3, "new_tokens": 256}),
])
def test_bench_grpo_modes_reach_their_benchmark(monkeypatch, argv, called, expected):
    """`h1rl bench grpo` hands its whole command line to h1rl.bench.grpo_bench, one parser for every mode, with each
    mode's own default shapes."""
    from h1rl import cli
    from h1rl.bench import grpo_bench

    calls = {}
    for name in ("run_grpo_benchmark", "run_against_teacher", "run_partial_rollouts_benchmark",
                 "run_overlap_benchmark"):
        monkeypatch.setattr(grpo_bench, name, lambda _name=name, **kw: calls.setdefault(_name, kw))
    assert cli.main(["bench", "grpo", *argv]) == 0
    assert list(calls) == [called]
    assert {k: calls[called][k] for k in expected} == expected
    with pytest.raises(SystemExit):  # one mode at a time
        cli.main(["bench", "grpo", "--against-teacher", "--overlap-scoring"])
