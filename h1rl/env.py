"""`h1rl env`: the versions a bug report needs (like `trl env`); printing them is this command's job.

    h1rl env

Lists h1rl's version (and git commit when run from a checkout), Python and the platform, torch with its CUDA build
and the accelerators it sees, and the versions of the libraries h1rl runs on (transformers, trl, peft, deepspeed,
accelerate, datasets, math-verify; the optional CUDA kernels mamba-ssm and causal-conv1d, which are only reported,
never imported: on a machine without CUDA a half-importable mamba_ssm misleads transformers).
"""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = ("transformers", "trl", "peft", "deepspeed", "accelerate", "datasets", "math-verify", "tokenizers",
             "safetensors", "mamba-ssm", "causal-conv1d")


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str | None:
    """The commit of the checkout h1rl is imported from, if it is one (with "+dirty" for local changes), else None."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def collect() -> dict[str, str]:
    """Name -> version (or state) of everything `h1rl env` reports, in print order."""
    import torch

    import h1rl

    commit = git_commit()
    info = {
        "h1rl": h1rl.__version__ + (f" (git {commit})" if commit else ""),
        "h1rl location": str(Path(h1rl.__file__).resolve().parent),
        "Python": platform.python_version(),
        "Platform": platform.platform(),
        "torch": torch.__version__,
        "CUDA (torch build)": torch.version.cuda or "none (CPU build)",
        "accelerators": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available() else "none (CPU)",
    }
    info.update({name: _version(name) for name in LIBRARIES})
    return info


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="h1rl env", description="print the versions a bug report needs").parse_args(argv)
    info = collect()
    width = max(map(len, info)) + 2
    print("Copy-paste this into a bug report:\n")
    for name, value in info.items():
        print(f"- {name + ':':<{width}}{value}")
    return 0
