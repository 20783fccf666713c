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
  - "torch": the pure-torch backend: the time loop runs in place on per-chunk buffers (one `addcmul_` per step,
    vectorised over B, H, P, N) and the backward is a hand-written reverse scan that recomputes each chunk's
    states from a checkpoint. Runs on any device.
  - "cpu_kernel": the same algorithm as a small C kernel (`h1rl.models.scan_kernel`: OpenMP over batch rows
    and blocks of heads, torch's thread count), compiled with gcc at first use and loaded with ctypes.
  - "cuda": mamba-ssm's `selective_scan_fn`, when mamba-ssm is importable and the tensors are on CUDA. The kernel
    takes no initial state, so a continuation (a chunked prefill's later chunks, the rows of a shared prompt) is
    run on it through `prepend_state_steps`: N steps prepended to the sequence rebuild the state exactly (in
    float32) before the real ones run. Its output and gradients are the continuation's (tested on CPU with the
    kernel stood in by the reference); a fresh state (None) runs the kernel as it is.
  - "auto": "cuda" if usable, else "cpu_kernel" on CPU tensors if it compiled, else "torch".
- `selective_state_update`: one decode step, in place on a float32 state (mamba-ssm's Triton kernel on CUDA
  when importable, else torch).
- `cpu_kernel_available()` (from `h1rl.models.scan_kernel`), `cuda_scan_available()`, `benchmark()`.

torch.compile and fake tensors: the "torch" and "cpu_kernel" backends run as two custom operators,
`torch.ops.h1rl.selective_scan_fwd` and `torch.ops.h1rl.selective_scan_bwd` (torch.library; the backward attached
with `register_autograd`). torch.compile puts each in its graph as one opaque node, with no graph break (their
Python time loops and ctypes calls are not traced), and takes output shapes, dtypes and strides from their fake
implementations, which FakeTensorMode uses too (shapes and memory of a step without running the scan). With
inductor, compile with `dynamic=False` for now: on a symbolic sequence length, torch 2.13's inductor fails with
"cannot determine truth value of Relational" when it saves a view (here the scan's inputs) for the backward
(it sorts symbolic strides without its shape environment: pytorch/pytorch#185871); backend="aot_eager" runs
dynamic lengths. "ref" is plain torch and "cuda" is mamba-ssm's kernel: neither goes through these ops.

Numerics and memory: all implementations compute in float32 (float64 inputs stay float64 in "ref" and
"torch", so that gradcheck works; the C kernel always computes in float32). y comes back in x.dtype, the final
state in the compute dtype. Gradients reach x, dt, A, B, C and initial_state for every implementation. For the
backward, "torch" and "cpu_kernel" keep the inputs and one state every chunk of time steps (64 in the kernel,
so N/64 of x's size); everything else is recomputed.

Benchmark (fwd+bwd timings of every CPU implementation): `python -m h1rl.models.scan`
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from h1rl.models import scan_kernel
from h1rl.models.scan_kernel import cpu_kernel_available, kernel_backward, kernel_forward

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn
except ImportError:
    _mamba_scan_fn = None
try:
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _mamba_state_update
except ImportError:
    _mamba_state_update = None

IMPLS = ("auto", "ref", "torch", "cpu_kernel", "cuda")
_TORCH_CHUNK_ELEMS = 1 << 22  # elements of one (L, B, H, P, N) buffer of the torch path: 16 MiB in float32


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


def cuda_scan_available():
    """True if mamba-ssm's CUDA selective scan is importable (see `selective_scan` for how it continues a state)."""
    return _mamba_scan_fn is not None


# ----------------------------------------------------------------------------------------------------------
# the torch and C backends as custom operators (torch.library), with their fake implementations and autograd
#
#   h1rl::selective_scan_fwd(backend, x, dt, A, B, C, s0?, save) -> (y, sT, ckpt)
#   h1rl::selective_scan_bwd(backend, x, dt, A, B, C, ckpt, dy?, dsT?, has_s0) -> (dx, ddt, dA, dB, dC, ds0)
#
# Dynamo cannot trace the backends (Python loops over time, ctypes calls): as custom ops they are one opaque node
# each in a torch.compile graph, and FakeTensorMode (and the compiler) get their output shapes, dtypes and strides
# from the fake implementations without running them. An op may return neither None nor an alias of an input, so
# ckpt without `save` and ds0 without s0 are empty tensors. The forward keeps the inputs and ckpt (the states at
# chunk starts) for the backward; the backward recomputes the rest.

_BACKENDS = {"torch": (_torch_forward, _torch_backward), "cpu_kernel": (kernel_forward, kernel_backward)}


def _ckpt_shape(backend, x, N):
    """Shape of the forward's saved states: (chunks, B, H, P, N) for "torch", (B, chunks, H, P, N) for the kernel."""
    Bsz, T, H, P = x.shape
    if backend == "torch":
        L = _torch_chunk_len(x, N)
        return ((T + L - 1) // L, Bsz, H, P, N)
    K = scan_kernel._KERNEL_CHUNK
    return (Bsz, (T + K - 1) // K, H, P, N)


@torch.library.custom_op("h1rl::selective_scan_fwd", mutates_args=())
def _scan_fwd(
    backend: str, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor | None, save: bool
) -> tuple[Tensor, Tensor, Tensor]:
    y, sT, ckpt = _BACKENDS[backend][0](x, dt, A, B, C, s0, save)
    if sT is s0:  # T = 0 in the torch backend: the state passes through
        sT = sT.clone(memory_format=torch.contiguous_format)
    return y, sT, x.new_empty(0) if ckpt is None else ckpt


@_scan_fwd.register_fake
def _scan_fwd_fake(backend, x, dt, A, B, C, s0, save):
    Bsz, _, H, P = x.shape
    N = A.shape[-1]
    ckpt = x.new_empty(_ckpt_shape(backend, x, N)) if save else x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(Bsz, H, P, N), ckpt


@torch.library.custom_op("h1rl::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    backend: str,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    ckpt: Tensor,
    dy: Tensor | None,
    dsT: Tensor | None,
    has_s0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, ddt, dA, dB, dC, ds0 = _BACKENDS[backend][1](x, dt, A, B, C, ckpt, dy, dsT, has_s0)
    if ds0 is None:
        ds0 = x.new_empty(0)
    elif ds0 is dsT:  # T = 0 in the torch backend: the gradient passes through
        ds0 = ds0.clone(memory_format=torch.contiguous_format)
    return dx, ddt, dA, dB, dC, ds0


@_scan_bwd.register_fake
def _scan_bwd_fake(backend, x, dt, A, B, C, ckpt, dy, dsT, has_s0):
    Bsz, _, H, P = x.shape
    N = A.shape[-1]
    fmt = torch.preserve_format if backend == "torch" else torch.contiguous_format  # as the backends allocate
    dx, ddt, dB, dC = (torch.empty_like(t, memory_format=fmt) for t in (x, dt, B, C))
    dA = torch.empty_like(A, memory_format=fmt)
    return dx, ddt, dA, dB, dC, x.new_empty(Bsz, H, P, N) if has_s0 else x.new_empty(0)


def _scan_setup_context(ctx, inputs, output):
    backend, x, dt, A, B, C, s0, save = inputs
    ckpt = output[2]
    ctx.backend, ctx.has_s0, ctx.saved_states = backend, s0 is not None, save
    ctx.save_for_backward(x, dt, A, B, C, ckpt)
    ctx.mark_non_differentiable(ckpt)


def _scan_backward(ctx, dy, dsT, _dckpt):
    if not ctx.saved_states:
        raise RuntimeError("h1rl::selective_scan_fwd ran with save=False: no states for the backward")
    x, dt, A, B, C, ckpt = ctx.saved_tensors
    dx, ddt, dA, dB, dC, ds0 = torch.ops.h1rl.selective_scan_bwd(ctx.backend, x, dt, A, B, C, ckpt, dy, dsT, ctx.has_s0)
    return None, dx, ddt, dA, dB, dC, ds0 if ctx.has_s0 else None, None


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


# ----------------------------------------------------------------------------------------------------------
# CUDA kernels from mamba-ssm (optional; not exercised by the CPU tests)


def prepend_state_steps(x, dt, A, B, C, initial_state):
    """N steps (N = state size) put before the sequence, in float32, that take a zero state to `initial_state`: step
    k has B = e_k (for every head), C = 0, dt = d (per channel) and x = s0[..., k] / (d * exp(d A[..., k] (N-1-k))),
    so it writes state component k and the later prepended steps decay it by exactly what x divided out. A scan that
    starts from zero over the N + T steps therefore returns the continuation's outputs (its last T) and final state,
    and its gradients reach `initial_state` and A through x. d = 1 / (1 + N max_n |A|) per channel keeps every
    decay above exp(-1) (no underflow); it is a constant to autograd. Returns x, dt, B, C over N + T steps."""
    Bsz, T, H, P = x.shape
    N = A.shape[-1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    Ac = A.to(cd)
    d = (1.0 / (1.0 + N * Ac.abs().amax(-1))).detach()  # (H, P)
    later = torch.arange(N - 1, -1, -1, device=x.device, dtype=cd)  # (N,) prepended steps after step k
    x_pre = initial_state.to(cd) / (d[..., None] * torch.exp(d[..., None] * Ac * later))  # (B, H, P, N)
    x_pre = x_pre.permute(0, 3, 1, 2)  # (B, N, H, P): prepended step k carries component k
    dt_pre = d.expand(Bsz, N, H, P)
    B_pre = torch.eye(N, device=x.device, dtype=cd).view(1, N, 1, N).expand(Bsz, N, H, N)  # (B, N, H, N): e_k
    C_pre = B_pre.new_zeros(Bsz, N, H, N)
    return (torch.cat([x_pre, x.to(cd)], 1), torch.cat([dt_pre, dt.to(cd)], 1),
            torch.cat([B_pre, B.to(cd)], 1), torch.cat([C_pre, C.to(cd)], 1))


def _cuda_scan(x, dt, A, B, C, initial_state=None):
    """mamba-ssm's fused scan. It takes u/delta as (b, H*P, T), A (H*P, N), B/C (b, H, N, T) and returns the
    last state as (b, H*P, N); dt is already positive, hence delta_softplus=False. A continuation from
    `initial_state` runs over the steps of `prepend_state_steps` (in float32), whose outputs are dropped."""
    Bsz, T, H, P = x.shape
    N = A.shape[-1]
    dtype = x.dtype
    if initial_state is not None:
        x, dt, B, C = prepend_state_steps(x, dt, A, B, C, initial_state)
    L = x.shape[1]
    u, delta = (t.reshape(Bsz, L, H * P).transpose(1, 2) for t in (x, dt.to(x.dtype)))  # (B, H*P, L)
    Bk, Ck = (t.to(x.dtype).permute(0, 2, 3, 1) for t in (B, C))  # (B, H, N, L)
    y, sT = _mamba_scan_fn(u, delta, A.reshape(H * P, N).float(), Bk, Ck, delta_softplus=False, return_last_state=True)
    y = y.transpose(1, 2).reshape(Bsz, L, H, P)[:, L - T :]  # (B, T, H, P): the prepended steps' outputs dropped
    return y.to(dtype), sT.float().reshape(Bsz, H, P, N)


# ----------------------------------------------------------------------------------------------------------
# public entry points


def _is_cuda(x) -> bool:  # a seam: the dispatch tests stand the kernel in on CPU tensors
    return x.is_cuda


def _resolve_impl(impl, x):
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {IMPLS}, got {impl!r}")
    cuda_ok = _mamba_scan_fn is not None and _is_cuda(x)
    if impl == "cuda" and not cuda_ok:
        raise ValueError(
            "selective_scan: impl='cuda' needs mamba-ssm installed and CUDA tensors "
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
    impl = _resolve_impl(impl, x)
    if impl == "cpu_kernel" and not cpu_kernel_available():
        impl = "torch"
    if impl == "ref":
        return selective_scan_ref(x, dt, A, B, C, initial_state, return_final_state)
    if impl == "cuda":
        y, sT = _cuda_scan(x, dt, A, B, C, initial_state)
    else:
        cd = torch.float64 if impl == "torch" and x.dtype == torch.float64 else torch.float32
        fmt = torch.contiguous_format if impl == "cpu_kernel" else torch.preserve_format  # one copy at most
        args = [None if t is None else t.to(dtype=cd, memory_format=fmt) for t in (x, dt, A, B, C, initial_state)]
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        y, sT, _ = torch.ops.h1rl.selective_scan_fwd(impl, *args, save)
    y = y.to(x.dtype)
    return (y, sT) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C):
    """One decode step: state (B, H, P, N) float32 updated IN PLACE; x, dt: (B, H, P); B, C: (B, H, N).
    Returns y (B, H, P) in x.dtype.
    Uses mamba_ssm's selective_state_update kernel when importable and tensors are on CUDA, else pure torch."""
    if _mamba_state_update is not None and state.is_cuda:
        return _mamba_state_update(state, x, dt, A, B, C)
    cd = state.dtype
    dts, xs, As, Bs, Cs = (t if t.dtype == cd else t.to(cd) for t in (dt, x, A, B, C))  # few ops: this runs per token
    state.mul_((dts[..., None] * As).exp_())  # (B, H, P, N)
    state.addcmul_((dts * xs)[..., None], Bs[:, :, None, :])
    y = torch.matmul(state, Cs[..., None])[..., 0]  # (B, H, P)
    return y if y.dtype == x.dtype else y.to(x.dtype)


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
