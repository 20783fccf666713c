"""Selective state-space scan of the "m2" Mamba mixer (Mamba-1 style: per-channel A, B/C shared per head).

This file owns the recurrence, for each batch b, head h, channel p, state n:

    a_t          = exp(dt[b,t,h,p] * A[h,p,n])                  (A < 0, A = -exp(A_log))
    s_t[b,h,p,n] = a_t * s_{t-1}[b,h,p,n] + dt[b,t,h,p] * B[b,t,h,n] * x[b,t,h,p]
    y[b,t,h,p]   = sum_n C[b,t,h,n] * s_t[b,h,p,n]

with s_{-1} = initial_state (or zeros). dt is already positive (the caller applies softplus); the D skip and
the z gate are the caller's. Shapes: x, dt (B, T, H, P); A (H, P, N); B, C (B, T, H, N); state (B, H, P, N).

Public API
- `selective_scan(..., impl=...)`: the training/prefill scan. Implementations:
  - "ref": `selective_scan_ref`, a plain sequential loop through autograd; slow; the reference for tests.
  - "torch": `_ScanFn` with the pure-torch backend: the time loop runs in place on per-chunk buffers
    (one `addcmul_` per step, vectorised over B, H, P, N) and the backward is a hand-written reverse scan
    that recomputes each chunk's states from a checkpoint. Runs on any device.
  - "cpu_kernel": the same algorithm as a small C kernel (source `_C_SOURCE` below; OpenMP over batch rows
    and blocks of heads, torch's thread count), compiled with gcc at first use and loaded with ctypes.
  - "cuda": mamba-ssm's `selective_scan_fn`, when mamba-ssm is importable and the tensors are on CUDA.
    It has no initial state, so "auto" uses "torch" on CUDA when an initial state is given.
    Never exercised by the CPU tests.
  - "auto": "cuda" if usable, else "cpu_kernel" on CPU tensors if it compiled, else "torch".
- `selective_state_update`: one decode step, in place on a float32 state (mamba-ssm's Triton kernel on CUDA
  when importable, else torch).
- `cpu_kernel_available()`, `cuda_scan_available()`, `benchmark()`.

Numerics and memory: all implementations compute in float32 (float64 inputs stay float64 in "ref" and
"torch", so that gradcheck works; the C kernel always computes in float32). y comes back in x.dtype, the final
state in the compute dtype. Gradients reach x, dt, A, B, C and initial_state for every implementation. For the
backward, "torch" and "cpu_kernel" keep the inputs and one state every chunk of time steps (64 in the kernel,
so N/64 of x's size); everything else is recomputed.

The C kernel, and where it deviates from torch
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

Benchmark (fwd+bwd timings of every CPU implementation): `python -m h1rl.models.scan`
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
import time
from pathlib import Path

import torch

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn
except ImportError:
    _mamba_scan_fn = None
try:
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _mamba_state_update
except ImportError:
    _mamba_state_update = None

logger = logging.getLogger(__name__)

IMPLS = ("auto", "ref", "torch", "cpu_kernel", "cuda")
_TORCH_CHUNK_ELEMS = 1 << 22  # elements of one (L, B, H, P, N) buffer of the torch path: 16 MiB in float32
_KERNEL_CHUNK = 64  # time steps between the C kernel's saved states
_KERNEL_WORK_BYTES = 4 << 20  # cap on one thread's backward buffer of recomputed states


# ----------------------------------------------------------------------------------------------------------
# reference


def selective_scan_ref(x, dt, A, B, C, initial_state=None, return_final_state=False):
    """Plain sequential loop, differentiable through autograd; the reference everything is tested against.

    Computes in float32 (float64 for float64 inputs). Returns y (B, T, H, P) in x.dtype [and the final
    state (B, H, P, N) in the compute dtype if return_final_state]."""
    _check_shapes(x, dt, A, B, C, initial_state)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, dts, As, Bs, Cs = (t.to(cd) for t in (x, dt, A, B, C))
    Bsz, T, H, P = x.shape
    s = xs.new_zeros(Bsz, H, P, A.shape[-1]) if initial_state is None else initial_state.to(cd)  # (B, H, P, N)
    ys = []
    # unbind, not x[:, t]: each indexing op's backward would write a full-size zero tensor (quadratic in T)
    for x_t, dt_t, B_t, C_t in zip(xs.unbind(1), dts.unbind(1), Bs.unbind(1), Cs.unbind(1), strict=True):
        u = (dt_t * x_t)[..., None] * B_t[:, :, None, :]  # (B, H, P, N)
        s = torch.exp(dt_t[..., None] * As) * s + u
        ys.append((s * C_t[:, :, None, :]).sum(-1))  # (B, H, P)
    y = torch.stack(ys, 1) if ys else xs.new_zeros(x.shape)  # (B, T, H, P)
    y = y.to(x.dtype)
    return (y, s) if return_final_state else y


def _check_shapes(x, dt, A, B, C, initial_state):
    if x.dim() != 4 or dt.shape != x.shape:
        raise ValueError(
            f"selective_scan: x and dt must both be (B, T, H, P), got {tuple(x.shape)} and {tuple(dt.shape)}"
        )
    Bsz, T, H, P = x.shape
    if A.dim() != 3 or A.shape[:2] != (H, P):
        raise ValueError(f"selective_scan: A must be (H, P, N) = ({H}, {P}, N), got {tuple(A.shape)}")
    N = A.shape[2]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (Bsz, T, H, N):
            raise ValueError(f"selective_scan: {name} must be (B, T, H, N) = {(Bsz, T, H, N)}, got {tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (Bsz, H, P, N):
        raise ValueError(
            f"selective_scan: initial_state must be (B, H, P, N) = {(Bsz, H, P, N)}, got {tuple(initial_state.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------
# pure-torch backend: chunked in-place time loop, hand-written reverse scan
#
# Work happens per chunk of L time steps on (L, B, H, P, N) buffers allocated once per call and reused
# (fresh 16 MiB tensors per chunk cost page faults); the chunk's small inputs are made time-major first, so
# that every broadcast runs over contiguous memory. The only Python loops are one addcmul_ per time step.


def _torch_chunk_len(x, N):
    Bsz, _, H, P = x.shape
    return max(8, min(256, _TORCH_CHUNK_ELEMS // (Bsz * H * P * N)))


def _time_major(t, sl):
    return t[:, sl].transpose(0, 1).contiguous()  # (B, T, H, .) -> (L, B, H, .)


def _torch_chunk_states(dtT, xT, BT, A, s, a, S):
    """Fills a with the decays exp(dt A) and S with the states after each step of one chunk, both
    (L, B, H, P, N). dtT, xT: (L, B, H, P); BT: (L, B, H, N); s: (B, H, P, N) state before the chunk."""
    torch.mul(dtT[..., None], A, out=a).exp_()
    torch.mul((dtT * xT)[..., None], BT[..., None, :], out=S)  # inputs u_t = dt x B
    S[0].addcmul_(a[0], s)
    for i in range(1, S.shape[0]):
        S[i].addcmul_(a[i], S[i - 1])


def _torch_forward(x, dt, A, B, C, s0, save):
    Bsz, T, H, P = x.shape
    N, L = A.shape[-1], _torch_chunk_len(x, A.shape[-1])
    s = x.new_zeros(Bsz, H, P, N) if s0 is None else s0  # (B, H, P, N)
    y = x.new_empty(x.shape)  # (B, T, H, P)
    a, S = (x.new_empty(min(L, T), Bsz, H, P, N) for _ in range(2))  # (L, B, H, P, N)
    ckpt = x.new_empty((T + L - 1) // L, Bsz, H, P, N) if save else None  # (chunks, B, H, P, N): state before
    for c, t0 in enumerate(range(0, T, L)):
        sl = slice(t0, t0 + L)
        if save:
            ckpt[c] = s
        n = min(L, T - t0)
        _torch_chunk_states(_time_major(dt, sl), _time_major(x, sl), _time_major(B, sl), A, s, a[:n], S[:n])
        y[:, sl] = torch.matmul(S[:n], _time_major(C, sl)[..., None])[..., 0].transpose(0, 1)
        s = S[n - 1].clone()  # S is overwritten by the next chunk
    return y, s, ckpt


def _torch_backward(x, dt, A, B, C, ckpt, dy, dsT, has_s0):
    Bsz, T, H, P = x.shape
    N, L = A.shape[-1], _torch_chunk_len(x, A.shape[-1])
    dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, B, C))
    dA = torch.zeros_like(A)
    dy = torch.zeros_like(x) if dy is None else dy
    g = x.new_zeros(Bsz, H, P, N) if dsT is None else dsT  # (B, H, P, N): dL/d(state after the chunk)
    bufs = [x.new_empty(min(L, T), Bsz, H, P, N) for _ in range(3)]  # (L, B, H, P, N)
    for c in reversed(range(ckpt.shape[0])):
        sl, n = slice(c * L, (c + 1) * L), min(L, T - c * L)
        a, S, G = (buf[:n] for buf in bufs)
        dtT, xT, BT, CT, dyT = (_time_major(t, sl) for t in (dt, x, B, C, dy))  # (L, B, H, P or N)
        _torch_chunk_states(dtT, xT, BT, A, ckpt[c], a, S)
        # reverse scan: G[i] = dL/ds_i = C_i dy_i + a_{i+1} G[i+1]
        torch.mul(dyT[..., None], CT[..., None, :], out=G)
        G[-1] += g
        for i in range(n - 2, -1, -1):
            G[i].addcmul_(a[i + 1], G[i + 1])
        g = a[0] * G[0]
        GB = torch.matmul(G, BT[..., None])[..., 0]  # (L, B, H, P): sum_n G B
        Z = a.mul_(G)  # dL/d(dt A) = G s_{i-1} a_i, in a's buffer
        Z[1:] *= S[:-1]
        Z[0] *= ckpt[c]
        dC[:, sl] = S.mul_(dyT[..., None]).sum(-2).transpose(0, 1)  # S, G and Z are consumed in place from here
        dB[:, sl] = G.mul_((dtT * xT)[..., None]).sum(-2).transpose(0, 1)
        dx[:, sl] = (dtT * GB).transpose(0, 1)
        ddt[:, sl] = (torch.mul(Z, A, out=G).sum(-1) + xT * GB).transpose(0, 1)
        dA += Z.mul_(dtT[..., None]).sum((0, 1))
    return dx, ddt, dA, dB, dC, (g if has_s0 else None)


# ----------------------------------------------------------------------------------------------------------
# C kernel backend: same algorithm; OpenMP over (batch row, block of heads)

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


def cuda_scan_available():
    """True if mamba-ssm's CUDA selective scan is importable (it takes no initial state; see `selective_scan`)."""
    return _mamba_scan_fn is not None


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


def _kernel_forward(x, dt, A, B, C, s0, save):
    Bsz, T, H, P = x.shape
    N, K = A.shape[-1], _KERNEL_CHUNK
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    s0 = None if s0 is None else s0.contiguous()
    y, sT = torch.empty_like(x), x.new_empty(Bsz, H, P, N)  # (B, T, H, P), (B, H, P, N)
    ckpt = x.new_empty(Bsz, (T + K - 1) // K, H, P, N) if save else None  # (B, chunks, H, P, N)
    _kernel_run("h1_scan_fwd", (x, dt, A, B, C, s0, y, sT, ckpt), (Bsz, T, H, P, N), backward=False)
    return y, sT, ckpt


def _kernel_backward(x, dt, A, B, C, ckpt, dy, dsT, has_s0):
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


# ----------------------------------------------------------------------------------------------------------
# autograd wrapper shared by the torch and C backends

_BACKENDS = {"torch": (_torch_forward, _torch_backward), "cpu_kernel": (_kernel_forward, _kernel_backward)}


class _ScanFn(torch.autograd.Function):
    """y, final state = scan(x, dt, A, B, C, s0); stores the inputs and the states at chunk starts only."""

    @staticmethod
    def forward(ctx, backend, x, dt, A, B, C, s0):
        save = any(ctx.needs_input_grad)
        y, sT, ckpt = _BACKENDS[backend][0](x, dt, A, B, C, s0, save)
        if save:
            ctx.backend, ctx.has_s0 = backend, s0 is not None
            ctx.save_for_backward(x, dt, A, B, C, ckpt)
        ctx.set_materialize_grads(False)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        if dy is None and dsT is None:
            return (None,) * 7
        x, dt, A, B, C, ckpt = ctx.saved_tensors
        grads = _BACKENDS[ctx.backend][1](x, dt, A, B, C, ckpt, dy, dsT, ctx.has_s0)
        return (None, *grads)


# ----------------------------------------------------------------------------------------------------------
# CUDA kernels from mamba-ssm (optional; not exercised by the CPU tests)


def _cuda_scan(x, dt, A, B, C):
    """mamba-ssm's fused scan. It takes u/delta as (b, H*P, T), A (H*P, N), B/C (b, H, N, T) and returns the
    last state as (b, H*P, N); dt is already positive, hence delta_softplus=False."""
    Bsz, T, H, P = x.shape
    N = A.shape[-1]
    u, delta = (t.reshape(Bsz, T, H * P).transpose(1, 2) for t in (x, dt.to(x.dtype)))  # (B, H*P, T)
    Bk, Ck = (t.to(x.dtype).permute(0, 2, 3, 1) for t in (B, C))  # (B, H, N, T)
    y, sT = _mamba_scan_fn(u, delta, A.reshape(H * P, N).float(), Bk, Ck, delta_softplus=False, return_last_state=True)
    return y.transpose(1, 2).reshape(Bsz, T, H, P), sT.float().reshape(Bsz, H, P, N)


# ----------------------------------------------------------------------------------------------------------
# public entry points


def _resolve_impl(impl, x, initial_state):
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {IMPLS}, got {impl!r}")
    cuda_ok = _mamba_scan_fn is not None and x.is_cuda and initial_state is None
    if impl == "cuda" and not cuda_ok:
        raise ValueError(
            "selective_scan: impl='cuda' needs mamba-ssm installed, CUDA tensors and initial_state=None "
            f"(mamba-ssm importable: {_mamba_scan_fn is not None}, device: {x.device}); use impl='auto' or 'torch'"
        )
    if impl == "cpu_kernel" and x.device.type != "cpu":
        raise ValueError(f"selective_scan: impl='cpu_kernel' needs CPU tensors, got {x.device}")
    if impl == "auto":
        impl = "cuda" if cuda_ok else "cpu_kernel" if x.device.type == "cpu" else "torch"
    return impl


def selective_scan(x, dt, A, B, C, initial_state=None, return_final_state=False, impl="auto"):
    """x, dt: (B, T, H, P); A: (H, P, N); B, C: (B, T, H, N); initial_state: (B, H, P, N) or None.
    Returns y (B, T, H, P) in x.dtype [and final state (B, H, P, N) float32 if return_final_state]."""
    _check_shapes(x, dt, A, B, C, initial_state)
    impl = _resolve_impl(impl, x, initial_state)
    if impl == "cpu_kernel" and not cpu_kernel_available():
        impl = "torch"
    if impl == "ref":
        return selective_scan_ref(x, dt, A, B, C, initial_state, return_final_state)
    if impl == "cuda":
        y, sT = _cuda_scan(x, dt, A, B, C)
    else:
        cd = torch.float64 if impl == "torch" and x.dtype == torch.float64 else torch.float32
        fmt = torch.contiguous_format if impl == "cpu_kernel" else torch.preserve_format  # one copy at most
        args = (None if t is None else t.to(dtype=cd, memory_format=fmt) for t in (x, dt, A, B, C, initial_state))
        y, sT = _ScanFn.apply(impl, *args)
    y = y.to(x.dtype)
    return (y, sT) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C):
    """One decode step: state (B, H, P, N) float32 updated IN PLACE; x, dt: (B, H, P); B, C: (B, H, N).
    Returns y (B, H, P) in x.dtype.
    Uses mamba_ssm's selective_state_update kernel when importable and tensors are on CUDA, else pure torch."""
    if _mamba_state_update is not None and state.is_cuda:
        return _mamba_state_update(state, x, dt, A, B, C)
    cd = state.dtype
    dts, xs = dt.to(cd), x.to(cd)
    state.mul_(torch.exp(dts[..., None] * A.to(cd)))  # (B, H, P, N)
    state.addcmul_((dts * xs)[..., None], B.to(cd)[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C.to(cd))  # (B, H, P)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# benchmark: python -m h1rl.models.scan


def benchmark(batch=4, heads=32, head_dim=16, state=16, lengths=(128, 512, 2048), ref_max_len=128, repeats=3):
    """Prints forward+backward milliseconds (best of `repeats`) of each CPU implementation."""
    impls = ["ref", "torch"] + (["cpu_kernel"] if cpu_kernel_available() else [])
    print(f"selective_scan fwd+bwd, B={batch} H={heads} P={head_dim} N={state}, {torch.get_num_threads()} threads")
    for T in lengths:
        x = torch.randn(batch, T, heads, head_dim, requires_grad=True)
        dt = torch.nn.functional.softplus(torch.randn(batch, T, heads, head_dim) - 2).requires_grad_()
        A = (-torch.arange(1, state + 1.0)).expand(heads, head_dim, state).contiguous().requires_grad_()
        B, C = (torch.randn(batch, T, heads, state, requires_grad=True) for _ in range(2))
        dy = torch.randn(batch, T, heads, head_dim)
        for impl in impls:
            if impl == "ref" and T > ref_max_len:
                continue
            best = float("inf")
            for _ in range(repeats):
                for t in (x, dt, A, B, C):
                    t.grad = None
                start = time.perf_counter()
                selective_scan(x, dt, A, B, C, impl=impl).backward(dy)
                best = min(best, time.perf_counter() - start)
            print(f"  T={T:5d} {impl:>10s}: {best * 1e3:9.1f} ms")


if __name__ == "__main__":
    benchmark()
