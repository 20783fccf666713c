"""The C kernel of the selective scan on CPU: its source, its build and cache, and the calls into it.

`h1rl.models.scan` owns the recurrence and chooses the implementation; this file owns the "cpu_kernel" one: the
same chunked algorithm as the scan's pure-torch backend (forward saving one state every `_KERNEL_CHUNK` steps,
backward recomputing each chunk's states from its saved one), written in C with OpenMP over (batch row, block of
heads), compiled with gcc at first use and loaded with ctypes. `kernel_forward` / `kernel_backward` have the torch
backend's signatures (`h1rl.models.scan._ScanFn` calls either); `cpu_kernel_available()` says whether it built.

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

_C_SOURCE = r"""
/* h1rl selective scan kernel. Layouts (all contiguous float32):
   x, dt, y, dx, ddt: (B, T, H, P); A: (H, P, N); Bm, Cm, dB, dC: (B, T, H, N);
   s0, sT, ds0, dsT, dA_b: (B, H, P, N); ck: (B, nck, H, P, N), the state before each chunk of K steps.
   One OpenMP work item is one batch row b and a block of hb consecutive heads [h0, h1); time is the outer
   loop, so every step reads one contiguous run of hb * P (or hb * N) floats from each tensor. Walking time
   inside one head instead strides H * P floats per step, which defeats the hardware prefetcher and the TLB
   once the tensors outgrow the last-level cache (measured: 2x slower at 16 MiB per tensor). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#define FTZ_BEGIN unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FTZ_END _mm_setcsr(saved_csr);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif
#define INLINE static inline __attribute__((always_inline))

/* exp(z), z clamped to [-87, 88]; Cephes expf polynomial (about 1 ulp). The clamps are integer minimums on the
   bit patterns (negative floats order by magnitude as unsigned ints), so the loops vectorise without fast-math. */
INLINE float h1_exp(float z) {
    union { float f; int32_t i; uint32_t u; } v = {z};
    v.u = v.u < 0xC2AE0000u ? v.u : 0xC2AE0000u; /* z >= -87 */
    v.i = v.i < 0x42B00000 ? v.i : 0x42B00000;   /* z <= 88 */
    z = v.f;
    const int32_t k = (int32_t)(z * 1.44269504088896341f + 128.5f) - 128; /* round(z / ln 2); casts a positive */
    const float fk = (float)k;
    const float r = z - fk * 0.693359375f + fk * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    v.i = (k + 127) << 23; /* 2^k */
    return p * v.f;
}

/* One time step of one head: s_out (P, N) = exp(dt A) s_in + dt x B, y (P) = s_out C if yt is not NULL,
   decays into e (P, N) if e is not NULL. N is a compile-time constant where the caller can make it one. */
INLINE void step(const float *xt, const float *dtt, const float *A, const float *bt, const float *ct,
                 const float *s_in, float *s_out, float *e, float *yt, int64_t P, const int64_t N) {
    for (int64_t p = 0; p < P; ++p) {
        const float d = dtt[p], u = d * xt[p];
        const float *a = A + p * N, *si = s_in + p * N;
        float *so = s_out + p * N, acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; ++n) {
            const float decay = h1_exp(d * a[n]);
            so[n] = decay * si[n] + u * bt[n];
            acc += ct[n] * so[n];
            if (e) e[p * N + n] = decay;
        }
        if (yt) yt[p] = acc;
    }
}

INLINE void fwd_block(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                      const float *s0, float *y, float *sT, float *ck, int64_t b, int64_t h0, int64_t h1,
                      int64_t T, int64_t H, int64_t P, const int64_t N, int64_t K, float *s) {
    const int64_t nck = (T + K - 1) / K, PN = P * N, span = (h1 - h0) * PN, blk = (b * H + h0) * PN;
    if (s0) memcpy(s, s0 + blk, span * sizeof(float));
    else memset(s, 0, span * sizeof(float));
    for (int64_t t = 0; t < T; ++t) {
        if (ck && t % K == 0) memcpy(ck + ((b * nck + t / K) * H + h0) * PN, s, span * sizeof(float));
        for (int64_t h = h0; h < h1; ++h) {
            const int64_t xi = ((b * T + t) * H + h) * P, bi = ((b * T + t) * H + h) * N;
            float *sh = s + (h - h0) * PN;
            step(x + xi, dt + xi, A + h * PN, Bm + bi, Cm + bi, sh, sh, NULL, y + xi, P, N);
        }
    }
    memcpy(sT + blk, s, span * sizeof(float));
}

/* Backward of one block. Per chunk in reverse: recompute decays E and states S from the checkpoint, then run
   the reverse scan g_t = C_t dy_t + a_{t+1} g_{t+1} (g: dL/ds_t) and form the gradients.
   work holds (2K + 3) * (h1 - h0) * P * N floats. */
INLINE void bwd_block(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                      const float *ck, const float *dy, const float *dsT, float *dx, float *ddt, float *dA_b,
                      float *dB, float *dC, float *ds0, int64_t b, int64_t h0, int64_t h1, int64_t T, int64_t H,
                      int64_t P, const int64_t N, int64_t K, float *work) {
    const int64_t nck = (T + K - 1) / K, PN = P * N, span = (h1 - h0) * PN, blk = (b * H + h0) * PN;
    float *g = work, *dacc = work + span; /* (hb, P, N) each */
    float *S = dacc + span;               /* (K + 1, hb, P, N): S[0] the chunk's start state, S[i + 1] after step i */
    float *E = S + (K + 1) * span;        /* (K, hb, P, N): decays exp(dt A) */
    if (dsT) memcpy(g, dsT + blk, span * sizeof(float));
    else memset(g, 0, span * sizeof(float));
    memset(dacc, 0, span * sizeof(float));
    for (int64_t c = nck - 1; c >= 0; --c) {
        const int64_t t0 = c * K, L = T - t0 < K ? T - t0 : K;
        memcpy(S, ck + ((b * nck + c) * H + h0) * PN, span * sizeof(float));
        for (int64_t i = 0; i < L; ++i) {
            for (int64_t h = h0; h < h1; ++h) {
                const int64_t xi = ((b * T + t0 + i) * H + h) * P, bi = ((b * T + t0 + i) * H + h) * N;
                const int64_t o = (h - h0) * PN;
                step(x + xi, dt + xi, A + h * PN, Bm + bi, Cm + bi, S + i * span + o, S + (i + 1) * span + o,
                     E + i * span + o, NULL, P, N);
            }
        }
        for (int64_t i = L - 1; i >= 0; --i) {
            for (int64_t h = h0; h < h1; ++h) {
                const int64_t xi = ((b * T + t0 + i) * H + h) * P, bi = ((b * T + t0 + i) * H + h) * N;
                const int64_t o = (h - h0) * PN;
                const float *bt = Bm + bi, *ct = Cm + bi;
                float *dbt = dB + bi, *dct = dC + bi;
                memset(dbt, 0, N * sizeof(float));
                memset(dct, 0, N * sizeof(float));
                for (int64_t p = 0; p < P; ++p) {
                    const float d = dt[xi + p], xv = x[xi + p], u = d * xv, dyv = dy[xi + p];
                    const int64_t q = o + p * N;
                    const float *a = A + h * PN + p * N, *e = E + i * span + q;
                    const float *sp = S + i * span + q, *sn = S + (i + 1) * span + q;
                    float *gp = g + q, *dap = dacc + q, gb = 0.0f, gz = 0.0f;
#pragma omp simd reduction(+ : gb, gz)
                    for (int64_t n = 0; n < N; ++n) {
                        const float gn = gp[n] + ct[n] * dyv; /* dL/ds_t */
                        const float z = gn * sp[n] * e[n];    /* dL/d(dt A) */
                        dct[n] += sn[n] * dyv;
                        dbt[n] += gn * u;
                        gb += gn * bt[n];
                        gz += z * a[n];
                        dap[n] += z * d;
                        gp[n] = gn * e[n];                    /* dL/ds_{t-1} through the decay */
                    }
                    dx[xi + p] = d * gb;
                    ddt[xi + p] = gz + xv * gb;
                }
            }
        }
    }
    if (ds0) memcpy(ds0 + blk, g, span * sizeof(float));
    memcpy(dA_b + blk, dacc, span * sizeof(float));
}

/* Work items: (b, block of hb heads). Both entry points return nonzero if a thread could not allocate its
   work buffer. */
int h1_scan_fwd(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                const float *s0, float *y, float *sT, float *ck, int64_t Bsz, int64_t T, int64_t H,
                int64_t P, int64_t N, int64_t K, int64_t hb, int nthreads) {
    const int64_t nhb = (H + hb - 1) / hb;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
        float *work = (float *)malloc((size_t)(hb * P * N) * sizeof(float));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < Bsz * nhb; ++item) {
            if (!work) continue;
            const int64_t b = item / nhb, h0 = (item % nhb) * hb, h1 = h0 + hb < H ? h0 + hb : H;
            if (N == 16) fwd_block(x, dt, A, Bm, Cm, s0, y, sT, ck, b, h0, h1, T, H, P, 16, K, work);
            else fwd_block(x, dt, A, Bm, Cm, s0, y, sT, ck, b, h0, h1, T, H, P, N, K, work);
        }
        free(work);
        FTZ_END
    }
    return failed;
}

int h1_scan_bwd(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                const float *ck, const float *dy, const float *dsT, float *dx, float *ddt, float *dA_b,
                float *dB, float *dC, float *ds0, int64_t Bsz, int64_t T, int64_t H, int64_t P, int64_t N,
                int64_t K, int64_t hb, int nthreads) {
    const int64_t nhb = (H + hb - 1) / hb;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
        float *work = (float *)malloc((size_t)((2 * K + 3) * hb * P * N) * sizeof(float));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < Bsz * nhb; ++item) {
            if (!work) continue;
            const int64_t b = item / nhb, h0 = (item % nhb) * hb, h1 = h0 + hb < H ? h0 + hb : H;
            if (N == 16)
                bwd_block(x, dt, A, Bm, Cm, ck, dy, dsT, dx, ddt, dA_b, dB, dC, ds0, b, h0, h1, T, H, P, 16, K, work);
            else
                bwd_block(x, dt, A, Bm, Cm, ck, dy, dsT, dx, ddt, dA_b, dB, dC, ds0, b, h0, h1, T, H, P, N, K, work);
        }
        free(work);
        FTZ_END
    }
    return failed;
}
"""


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
    key = hashlib.sha256("\0".join([_C_SOURCE, *flags, cpu or "", platform.machine()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("H1RL_CACHE_DIR") or Path.home() / ".cache" / "h1rl")
    lib_path = root / "kernels" / key / "h1rl_scan.so"
    try:
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                src, out = Path(tmp) / "h1rl_scan.c", Path(tmp) / "h1rl_scan.so"
                src.write_text(_C_SOURCE)
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
