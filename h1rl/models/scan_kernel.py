"""The C kernel of the selective scan on CPU: its source, its build and cache, and the calls into it.

`h1rl.models.scan` owns the recurrence and chooses the implementation; this file owns the "cpu_kernel" one: the
same chunked algorithm as the scan's pure-torch backend (forward saving one state every `_KERNEL_CHUNK` steps,
backward recomputing each chunk's states from its saved one), written in C (`h1rl/models/csrc/selective_scan.c`,
package data read with importlib.resources) with OpenMP over (batch row, block of heads), compiled with gcc at first
use and loaded with ctypes. `kernel_forward` / `kernel_backward` have the torch backend's signatures (the custom
ops `h1rl::selective_scan_fwd` / `_bwd` of `h1rl.models.scan` call either); `cpu_kernel_available()` says whether
it built (a constant to torch.compile, which does not trace the build).

Where it deviates from torch, and how it is built
- exp is a Cephes polynomial (about 1 ulp) on an argument clamped to [-87, 88], written without float
  branches so that gcc vectorises it at plain -O3 (no -ffast-math; libm's expf would not vectorise).
  A decay below exp(-87) therefore comes out as about 1.6e-38 instead of a smaller number or 0.
- Denormals are flushed to zero inside the kernel's threads (x86 MXCSR, restored on exit): tiny decays would
  otherwise hit the slow denormal path. The effect is below 1e-38 absolute.
- Cache: `$H1RL_CACHE_DIR/kernels/<key>/` (default `~/.cache/h1rl`), compiled in a temporary directory and
  then `os.replace`d, so concurrent processes never load a half-written library. The kernel is compiled with
  `-march=native`; a home directory shared by a cluster of different CPUs must not hand one node's binary
  (say AVX-512) to another, so the key hashes the source, the flags and this CPU's model name and feature
  flags from /proc/cpuinfo. Where /proc/cpuinfo is unreadable the build uses portable flags instead.
- Not attempted when gcc is missing or H1RL_DISABLE_CPU_KERNEL=1; any failure logs one warning and the
  "torch" path is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_KERNEL_CHUNK = 64  # time steps between the C kernel's saved states
_KERNEL_WORK_BYTES = 4 << 20  # cap on one thread's backward buffer of recomputed states


def _c_source() -> str:
    """The kernel's C source: h1rl/models/csrc/selective_scan.c, package data (wherever the package is installed)."""
    return (importlib.resources.files("h1rl.models") / "csrc" / "selective_scan.c").read_text()


def _cpu_signature():
    """This CPU's model name and feature flags, or None where /proc/cpuinfo cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    keys = ("model name", "flags", "Features", "CPU part")  # x86 and arm spellings
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in keys:
            found.setdefault(key.strip(), value.strip())
    return repr(sorted(found.items())) if found else None


@functools.cache
def _cpu_kernel():
    """The compiled kernel library, or None (after one warning) if it cannot be built or loaded."""
    if os.environ.get("H1RL_DISABLE_CPU_KERNEL") == "1":
        logger.info("H1RL_DISABLE_CPU_KERNEL=1: selective_scan uses the torch path on CPU")
        return None
    gcc = shutil.which("gcc")
    if gcc is None:
        logger.warning("gcc not found: selective_scan falls back to the (slower) torch path on CPU")
        return None
    cpu = _cpu_signature()
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC"] + (["-march=native"] if cpu else [])
    root = Path(os.environ.get("H1RL_CACHE_DIR") or Path.home() / ".cache" / "h1rl")
    try:
        source = _c_source()
        key = hashlib.sha256("\0".join([source, *flags, cpu or "", platform.machine()]).encode()).hexdigest()[:16]
        lib_path = root / "kernels" / key / "h1rl_scan.so"
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                src, out = Path(tmp) / "h1rl_scan.c", Path(tmp) / "h1rl_scan.so"
                src.write_text(source)
                proc = subprocess.run(
                    [gcc, *flags, str(src), "-o", str(out)], check=False, capture_output=True, text=True, timeout=300
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"gcc failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
                os.replace(out, lib_path)  # atomic: a concurrent process sees no file or a whole one
        lib = ctypes.CDLL(str(lib_path))
    except Exception as err:  # noqa: BLE001 -- any build/load failure means: use the torch path
        logger.warning("could not build the CPU scan kernel (%s); selective_scan falls back to the torch path", err)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.h1_scan_fwd.argtypes = [ptr] * 9 + [i64] * 7 + [ctypes.c_int]
    lib.h1_scan_fwd.restype = ctypes.c_int
    lib.h1_scan_bwd.argtypes = [ptr] * 14 + [i64] * 7 + [ctypes.c_int]
    lib.h1_scan_bwd.restype = ctypes.c_int
    return lib


@torch.compiler.assume_constant_result  # torch.compile uses the answer at trace time; it does not trace the build
def cpu_kernel_available():
    """True if the C kernel compiled (or was cached) and loaded in this process."""
    return _cpu_kernel() is not None


def _ptr(t):
    return None if t is None else t.data_ptr()


def _kernel_run(entry, tensors, shape, backward):
    """Calls h1_scan_fwd / h1_scan_bwd with torch's thread count (fewer for small scans). A work item is one
    batch row and hb heads: about four items per thread, as many heads each as that allows (longer contiguous
    reads per step), and in the backward at most _KERNEL_WORK_BYTES of recomputed states per thread."""
    Bsz, T, H, P, N = shape
    nthreads = max(1, min(torch.get_num_threads(), Bsz * H, Bsz * T * H * P * N >> 16))  # >= 64Ki updates each
    hb = max(1, min(H, Bsz * H // (4 * nthreads)))
    if backward:
        hb = max(1, min(hb, _KERNEL_WORK_BYTES // ((2 * _KERNEL_CHUNK + 3) * P * N * 4)))
    if getattr(_cpu_kernel(), entry)(*map(_ptr, tensors), Bsz, T, H, P, N, _KERNEL_CHUNK, hb, nthreads):
        raise MemoryError(f"selective_scan: the CPU kernel could not allocate its work buffer ({entry})")


def kernel_forward(x, dt, A, B, C, s0, save):
    Bsz, T, H, P = x.shape
    N, K = A.shape[-1], _KERNEL_CHUNK
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    s0 = None if s0 is None else s0.contiguous()
    y, sT = torch.empty_like(x), x.new_empty(Bsz, H, P, N)  # (B, T, H, P), (B, H, P, N)
    ckpt = x.new_empty(Bsz, (T + K - 1) // K, H, P, N) if save else None  # (B, chunks, H, P, N)
    _kernel_run("h1_scan_fwd", (x, dt, A, B, C, s0, y, sT, ckpt), (Bsz, T, H, P, N), backward=False)
    return y, sT, ckpt


def kernel_backward(x, dt, A, B, C, ckpt, dy, dsT, has_s0):
    Bsz, T, H, P = x.shape
    N = A.shape[-1]
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    dy = torch.zeros_like(x) if dy is None else dy.contiguous()
    dsT = None if dsT is None else dsT.contiguous()
    dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, B, C))
    dA_b = x.new_empty(Bsz, H, P, N)  # per batch row, summed below: rows run in parallel
    ds0 = x.new_empty(Bsz, H, P, N) if has_s0 else None
    tensors = (x, dt, A, B, C, ckpt, dy, dsT, dx, ddt, dA_b, dB, dC, ds0)
    _kernel_run("h1_scan_bwd", tensors, (Bsz, T, H, P, N), backward=True)
    return dx, ddt, dA_b.sum(0), dB, dC, ds0
