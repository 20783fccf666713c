"""The wheel ships what the package needs: built from a clean copy of the tree, installed non-editable into a fresh
venv, `h1rl demo --quick` runs from another directory and writes its report (the recipes, DeepSpeed configs, bundled
teacher and C source are read from the installed package, not from a checkout).

The fresh venv borrows the third-party dependencies of the running environment (a path to its site-packages), so the
test needs no network and cannot pull another torch build; h1rl itself comes only from the wheel (checked).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SHIPPED = [  # package data a non-editable install needs
    "h1rl/recipes/demo.yaml", "h1rl/recipes/demo_quick.yaml", "h1rl/recipes/distill_tiny.yaml",
    "h1rl/recipes/grpo_math.yaml", "h1rl/recipes/deepspeed/zero2.json", "h1rl/recipes/deepspeed/zero3.json",
    "h1rl/recipes/deepspeed/zero3_offload.json", "h1rl/recipes/accelerate/zero2.yaml",
    "h1rl/recipes/accelerate/zero3.yaml", "h1rl/recipes/accelerate/zero3_offload.yaml",
    "h1rl/recipes/launch/hostfile", "h1rl/recipes/launch/slurm_grpo.sbatch", "h1rl/models/csrc/selective_scan.c",
    "h1rl/assets/teacher/model.safetensors", "h1rl/assets/teacher/config.json", "h1rl/assets/tokenizer/tokenizer.json",
    "h1rl/assets/tokenizer/chat_template.jinja", "h1rl/assets/data/test.jsonl",
]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def clean_copy(dest: Path) -> Path:
    """The files git would put in a checkout (tracked, plus new files not ignored): no egg-info, no build leftovers,
    which could hide a package-data glob that matches nothing."""
    files = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    assert not list(dest.glob("*.egg-info"))
    return dest


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_from_elsewhere(tmp_path):
    if not (REPO / ".git").exists():
        pytest.fail("needs a git checkout of h1rl to know which files belong to the tree")
    src = clean_copy(tmp_path / "src")
    run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp_path / "dist"), "--no-deps",
         "--no-build-isolation", "-q"])
    wheel = next((tmp_path / "dist").glob("h1rl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in SHIPPED if name not in names]
    assert not missing, f"not in the wheel: {missing}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_h1rl_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")  # after the venv's own packages
    run([str(python), "-m", "pip", "install", "--no-deps", "-c", str(REPO / "constraints.txt"), str(wheel), "-q"])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    where = run([str(python), "-c", "import h1rl, h1rl.recipes as r; print(h1rl.__file__); print(r.find('grpo_math'))"],
                cwd=elsewhere, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's h1rl, not the checkout's
    run([str(bin_dir / "h1rl"), "demo", "--quick", "--output_dir", "demo"], cwd=elsewhere, env=env, timeout=1800)
    out = elsewhere / "demo"
    assert (out / "report.md").read_text().startswith("# h1rl demo report")
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary["accuracy"]) == {"teacher", "hybrid_distilled", "hybrid_grpo"}
    assert (out / "grpo" / "final" / "model.safetensors").is_file()
