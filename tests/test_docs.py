"""Every command in README.md and docs/ runs as written (smoke size): a doc command that breaks fails CI.

Each ```bash and ```python block of README.md and the guides runs, in the order of the page, in one temporary
working directory shared by all pages (pages are self-contained: each starts with what it needs, e.g. the data and
the distillation that GRPO trains on; a command an earlier page ran finds its work done and resumes, as it would for
a user following the docs in one directory). Each command has a timeout. `h1rl ...` commands run through the console
script's entry point (`h1rl.cli.main`), `python -m h1rl...` and Python blocks through runpy, in one Python process
per page (torch, transformers and TRL are imported once per page, not once per command); other commands run in bash.

Smoke size: the test appends overrides that shrink steps and data, the way a user would shorten a run (`smoke`
below; a later `--key value` wins over an earlier one): `h1rl grpo` runs at most 3 steps with completions of at most
32 tokens, `h1rl distill` 2 steps per stage and 2-step MMR probes, `h1rl eval` 8 problems, `h1rl demo` smaller than
`demo_quick`, the benchmarks at tiny lengths (`scripts/compare_decode_step.py` from the checkout, against HEAD); dry
runs run as they are. `pip install` commands are not run (the test
runs in the installed package; tests/test_wheel.py checks an install from a wheel). Python blocks run as scripts
(`>>>` blocks as doctests).

A block that cannot run on a CPU machine carries a marker on the line above its fence, with the reason:

    <!-- doc-test: skip (needs 8 GPUs) -->

The skipped blocks are listed by `test_skips_are_few_and_justified`, which keeps the list short.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# README first, then the guides in the order README lists them
PAGES = ["README.md", "docs/cli.md", "docs/distillation.md", "docs/grpo.md", "docs/rewards.md", "docs/recipes.md",
         "docs/multinode.md", "docs/architecture.md", "docs/benchmarks.md"]
MARKER = re.compile(r"<!--\s*doc-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
TIMEOUT_S = 600  # per command
MAX_SKIPS = 6
@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None  # the marker's reason

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The ```bash and ```python blocks of a page, with their skip markers."""
    lines = (REPO / page).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(bash|python)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, j = i, i + 1
        while not lines[j].startswith("```"):
            j += 1
        reasons = []
        k = start - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):
            match = MARKER.search(lines[k])
            if match:
                reasons.append(match["reason"])
            k -= 1
        text = "\n".join(lines[start + 1 : j])
        skip = reasons[0] if reasons else None
        out.append(Block(page, start + 1, fence[1], text, skip))
        i = j + 1
    return out


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(line)
    return out


# ---- smoke size ------------------------------------------------------------------------------------------------


def _value(argv: list[str], key: str) -> str | None:
    """The last value given for `--key` (as `--key value` or `--key=value`), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == key and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(key + "="):
            value = arg.split("=", 1)[1]
    return value


DEMO_SMOKE = ["--task.train_size", "16", "--task.test_size", "4", "--eval.max_completion_length", "32",
              "--sampled_eval", "{num_samples: 2, max_completion_length: 16}", "--throughput_new_tokens", "4",
              "--distill.stages.0.max_steps", "2", "--distill.stages.1.max_steps", "2",
              "--distill.importance.probe_steps", "1", "--distill.data.calibration_samples", "4",
              "--grpo.max_steps", "1", "--grpo.per_device_train_batch_size", "8", "--grpo.num_generations", "4",
              "--grpo.max_completion_length", "16"]
GRPO_SMOKE = ["--max_completion_length", "32"]  # and at most 3 steps


def _distill_smoke(args: list[str], cwd: Path) -> list[str]:
    """`--stages.K.max_steps 2` for each stage of the recipe (as the command's own flags shape it) that is longer,
    and 2-step MMR probes."""
    from h1rl.config_io import load_config
    from h1rl.distill.config import DistillConfig
    from h1rl.flags import flag_overrides, split_config
    from h1rl.recipes import find

    recipe, rest = split_config(args)
    keys = [a for i, a in enumerate(rest) if a != "--log_level" and (i == 0 or rest[i - 1] != "--log_level")]
    path = cwd / recipe if (cwd / recipe).is_file() else find(recipe, kind="distill")
    config = load_config(DistillConfig, path, flag_overrides(keys))
    extra = []
    for k, stage in enumerate(config.stages):
        if stage.max_steps > 2:
            extra += [f"--stages.{k}.max_steps", "2"]
    if config.importance.probe_steps > 2:
        extra += ["--importance.probe_steps", "2"]
    return extra


def smoke(argv: list[str], cwd: Path = REPO) -> list[str]:
    """`argv` with the overrides that shrink it to smoke size (the module docstring); `cwd`: where it runs."""
    if "--help" in argv or "--dry-run" in argv:
        return argv
    head = argv[:3] if argv[0] == "python" else argv[:2]
    if head == ["h1rl", "demo"]:
        return argv if "--quick" in argv else argv + DEMO_SMOKE
    if head == ["h1rl", "distill"]:
        return argv + _distill_smoke(argv[2:], cwd)
    if head == ["h1rl", "grpo"]:
        steps = _value(argv, "--max_steps")
        return argv + GRPO_SMOKE + ([] if steps is not None and 0 < int(steps) <= 3 else ["--max_steps", "2"])
    if head == ["h1rl", "eval"]:
        limit = _value(argv, "--max_samples")
        return argv if limit is not None and int(limit) <= 8 else argv + ["--max_samples", "8"]
    if argv[:3] == ["h1rl", "bench", "scan"]:
        return argv + ["--seq-lens", "64", "--repeats", "1", "--batch", "1"]
    if argv[:3] == ["h1rl", "bench", "grpo"]:  # every mode: a tiny model, short caps, one timed step
        return argv + ["--new-tokens", "16", "--caps", "64", "--repeats", "1", "--hidden", "64", "--layers", "2",
                       "--vocab", "512", "--generations", "2", "--batch", "2"]
    if argv[:2] == ["python", "scripts/compare_decode_step.py"]:  # a checkout's script, against HEAD (a clone may
        # lack the page's revision)
        return ["python", str(REPO / argv[1]), "HEAD", *argv[3:], "--hidden", "64", "--vocab", "512", "--rows", "1",
                "--rounds", "1"]
    if argv[:3] == ["h1rl", "bench", "rollout"]:
        return argv + ["--lengths", "16", "--layers", "2", "--hidden", "64", "--generations", "2", "--batch", "1"]
    return argv


# ---- running ---------------------------------------------------------------------------------------------------

# The worker: runs `h1rl ...` (the console script's entry point, h1rl.cli.main), `python -m MODULE ...` and python
# scripts in one Python process per page, so that torch, transformers and TRL are imported once per page, not once
# per command. A request is a JSON line {argv, cwd, done}; the exit status goes to the file `done`.
WORKER = r"""
import json, os, runpy, sys, traceback
for line in sys.stdin:
    request = json.loads(line)
    os.chdir(request["cwd"])
    argv, code = request["argv"], 0
    try:
        if argv[0] == "h1rl":
            from h1rl.cli import main
            sys.argv = argv
            code = main(argv[1:]) or 0
        elif argv[:2] == ["python", "-m"]:
            sys.argv = argv[2:]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    with open(request["done"] + ".tmp", "w") as f:
        f.write(str(code))
    os.replace(request["done"] + ".tmp", request["done"])
"""


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # h1rl and python of this environment
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "MPLBACKEND": "Agg"}


class Runner:
    """Runs a page's commands in `cwd`: h1rl and python ones in the page's worker, the rest with bash."""

    def __init__(self, cwd: Path, log: Path):
        self.cwd, self.log = cwd, log
        self.out = open(log, "w")  # noqa: SIM115  (closed in close())
        self.worker = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=self.out,
                                       stderr=subprocess.STDOUT, env=env(), text=True)
        self.count = 0

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.stdin.close()
            try:
                self.worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        self.out.close()

    def fail(self, where: str, what: str) -> None:
        self.out.flush()
        pytest.fail(f"{where}: {what}\n--- output (last 8000 characters)\n{self.log.read_text()[-8000:]}")

    def run(self, where: str, argv: list[str]) -> None:
        """One command (a list of words) as the page writes it, at smoke size."""
        if argv[0] == "h1rl" or argv[:2] == ["python", "-m"] and argv[2].startswith("h1rl") or \
                argv[0] == "python" and argv[1].endswith(".py"):
            self.count += 1
            done = self.cwd / f".doc_test_{self.count}.done"
            self.out.write(f"\n$ {shlex.join(argv)}   [{time.strftime('%H:%M:%S')}]\n")
            self.out.flush()
            self.worker.stdin.write(json.dumps({"argv": argv, "cwd": str(self.cwd), "done": str(done)}) + "\n")
            self.worker.stdin.flush()
            deadline = time.monotonic() + TIMEOUT_S
            while not done.exists():
                if self.worker.poll() is not None:
                    self.fail(where, f"`{shlex.join(argv)}` ended the worker (exit {self.worker.returncode})")
                if time.monotonic() > deadline:
                    self.worker.kill()
                    self.fail(where, f"`{shlex.join(argv)}` ran past {TIMEOUT_S} s")
                time.sleep(0.1)
            code = int(done.read_text())
        else:
            self.out.write(f"\n$ {shlex.join(argv)}   [{time.strftime('%H:%M:%S')}]\n")
            self.out.flush()
            done = subprocess.run(argv, cwd=self.cwd, env=env(), stdout=self.out, stderr=subprocess.STDOUT,
                                  timeout=TIMEOUT_S)
            code = done.returncode
        if code != 0:
            self.fail(where, f"`{shlex.join(argv)}` exited {code}")

    def line(self, block: Block, command: str) -> None:
        """A command line of a bash block: its `&&`-joined parts in order, `pip install` not run."""
        for part in parts(command):
            if part[:2] != ["pip", "install"]:
                self.run(block.id, smoke(part, self.cwd))

    def python(self, block: Block) -> None:
        if block.text.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(block.text, {}, block.id, block.page, block.line)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
            here = os.getcwd()
            os.chdir(self.cwd)
            try:
                runner.run(test)
            finally:
                os.chdir(here)
            assert runner.failures == 0, f"{block.id}: the doctest failed (see the output above)"
            return
        script = self.cwd / f"block_{Path(block.page).stem}_{block.line}.py"
        script.write_text(block.text + "\n")
        self.run(block.id, ["python", script.name])


def parts(command: str) -> list[list[str]]:
    """The `&&`-joined commands of a command line, as words."""
    out, part = [], []
    for word in [*shlex.split(command, comments=True), "&&"]:
        if word != "&&":
            part.append(word)
        elif part:
            out.append(part)
            part = []
    return out


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs")


ALL = [b for page in PAGES for b in blocks(page)]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(page, workdir):
    runner = Runner(workdir, workdir / f".doc_test_{Path(page).stem}.log")
    try:
        for block in (b for b in ALL if b.page == page and not b.skip):
            if block.lang == "python":
                runner.python(block)
            else:
                for command in commands(block.text):
                    runner.line(block, command)
    finally:
        runner.close()


def test_skips_are_few_and_justified():
    skipped = [b for b in ALL if b.skip]
    assert len(skipped) <= MAX_SKIPS, [b.id for b in skipped]
    for block in skipped:
        assert len(block.skip.split()) >= 2, f"{block.id}: say why the block cannot run ({block.skip!r})"


def test_blocks_are_found_and_shrunk():
    """The extraction and the smoke overrides themselves."""
    readme = [b for b in ALL if b.page == "README.md"]
    assert {b.lang for b in readme} == {"bash", "python"} and any(b.skip for b in readme)
    assert commands("a \\\n  --b 1  # note\n\n# only a comment\nc") == ["a  --b 1  # note", "c"]
    assert parts("pip install -e . && h1rl grpo --config grpo_math  # x") == [
        ["pip", "install", "-e", "."], ["h1rl", "grpo", "--config", "grpo_math"]]
    assert smoke(["h1rl", "grpo", "--config", "grpo_math", "--max_steps", "5"])[-2:] == ["--max_steps", "2"]
    assert smoke(["h1rl", "grpo", "--config", "x.yaml", "--max_steps", "3"]) == [
        "h1rl", "grpo", "--config", "x.yaml", "--max_steps", "3", *GRPO_SMOKE]
    assert smoke(["h1rl", "eval", "--model", "bundled"])[-2:] == ["--max_samples", "8"]
    assert smoke(["h1rl", "distill", "--config", "distill_tiny"])[-6:] == [
        "--stages.0.max_steps", "2", "--stages.1.max_steps", "2", "--importance.probe_steps", "2"]
