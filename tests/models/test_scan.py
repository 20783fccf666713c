"""Tests of h1rl/models/scan.py and its C kernel (scan_kernel.py): every fast scan against the sequential reference
(outputs, final state, gradients of all inputs), gradcheck of the torch backward, bf16 inputs, decode steps against
the scan, and prefill continuation. Inputs are fresh random draws each run (no fixed seed); the seed is in the
assertion message."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from h1rl.models import scan, scan_kernel
from h1rl.models.scan import selective_scan, selective_scan_ref, selective_state_update

FAST_IMPLS = ["torch", pytest.param("cpu_kernel", marks=pytest.mark.skipif(
    not scan.cpu_kernel_available(), reason="CPU kernel did not build here (gcc missing or disabled)"))]  # fmt: skip

# (B, T, H, P, N): T = 1, T across several kernel/torch chunks and not a multiple of them, P != N, B = 1, N = 16
# (3, 70, 11, 2, 16): the kernel's blocks of heads do not divide H (on 1 and 2 threads)
SHAPES = [(2, 1, 3, 5, 4), (1, 150, 2, 3, 7), (3, 67, 2, 4, 16), (2, 300, 4, 6, 16), (3, 70, 11, 2, 16)]


def make_inputs(Bsz, T, H, P, N, dtype=torch.float64, dt_max=5.0, with_state=True):
    """Realistic ranges: dt = softplus(N(0,1) - 1) with a few values pushed to dt_max; A = -(1..N) per channel,
    jittered; B, C ~ N(0, 1)."""
    x = torch.randn(Bsz, T, H, P, dtype=dtype)
    dt = F.softplus(torch.randn(Bsz, T, H, P, dtype=dtype) - 1)
    dt = torch.where(torch.rand_like(dt) < 0.05, torch.rand_like(dt) * dt_max, dt)
    A = -torch.arange(1, N + 1, dtype=dtype).expand(H, P, N) * torch.empty(H, P, 1, dtype=dtype).uniform_(0.5, 1.5)
    B, C = torch.randn(Bsz, T, H, N, dtype=dtype), torch.randn(Bsz, T, H, N, dtype=dtype)
    s0 = torch.randn(Bsz, H, P, N, dtype=dtype) if with_state else None
    return [x, dt, A.contiguous(), B, C, s0]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def seed():
    s = torch.seed()  # fresh each run; reported on failure
    torch.manual_seed(s)
    return s


def run(fn, inputs, dy, dsT, **kw):
    """Scan, backpropagate (dy, dsT) and return (y, final state, grads of all inputs)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, sT = fn(*leaves[:5], initial_state=leaves[5], return_final_state=True, **kw)
    ((y.double() * dy).sum() + (sT.double() * dsT).sum()).backward()
    return y, sT, [t.grad for t in leaves]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_impl_matches_reference(impl, shape, seed):
    inputs = make_inputs(*shape)
    dy, dsT = torch.randn(*shape[:4], dtype=torch.float64), torch.randn(shape[0], *shape[2:], dtype=torch.float64)
    y_ref, s_ref, g_ref = run(selective_scan_ref, inputs, dy, dsT)  # float64 ground truth
    y, s, g = run(selective_scan, [t.float() for t in inputs], dy, dsT, impl=impl)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5, f"y, seed {seed}"
    assert rel_err(s, s_ref) < 1e-5, f"final state, seed {seed}"
    for name, a, b in zip(["x", "dt", "A", "B", "C", "initial_state"], g, g_ref, strict=True):
        assert rel_err(a, b) < 1e-4, f"grad {name}: {rel_err(a, b):.2e}, seed {seed}"


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_many_short_chunks(impl, seed, monkeypatch):
    """Chunks of 8 (torch) / 5 (kernel) steps: many checkpoints and a partial last chunk."""
    monkeypatch.setattr(scan, "_TORCH_CHUNK_ELEMS", 1)  # the torch path's minimum chunk, 8 steps
    monkeypatch.setattr(scan_kernel, "_KERNEL_CHUNK", 5)
    shape = (2, 37, 3, 4, 5)
    inputs = make_inputs(*shape)
    dy, dsT = torch.randn(*shape[:4], dtype=torch.float64), torch.randn(shape[0], *shape[2:], dtype=torch.float64)
    y_ref, s_ref, g_ref = run(selective_scan_ref, inputs, dy, dsT)
    y, s, g = run(selective_scan, [t.float() for t in inputs], dy, dsT, impl=impl)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5, f"seed {seed}"
    for a, b in zip(g, g_ref, strict=True):
        assert rel_err(a, b) < 1e-4, f"seed {seed}"


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_zero_initial_state_and_partial_outputs(impl, seed):
    """initial_state=None means zeros; only y or only the final state may carry a gradient."""
    x, dt, A, B, C, _ = (t.float() if t is not None else None for t in make_inputs(2, 70, 2, 4, 8, with_state=False))
    y_ref, s_ref = selective_scan_ref(x, dt, A, B, C, return_final_state=True)
    y, s = selective_scan(x, dt, A, B, C, return_final_state=True, impl=impl)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5, f"seed {seed}"
    for pick in (0, 1):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
        ref_leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
        selective_scan(*leaves, return_final_state=True, impl=impl)[pick].sum().backward()
        selective_scan_ref(*ref_leaves, return_final_state=True)[pick].sum().backward()
        for a, b in zip(leaves, ref_leaves, strict=True):  # the final state does not depend on C: no grad in ref
            b_grad = torch.zeros_like(b) if b.grad is None else b.grad
            assert rel_err(a.grad, b_grad) < 1e-4, f"output {pick}, seed {seed}"


def test_gradcheck_torch_impl(seed):
    inputs = [t.requires_grad_() for t in make_inputs(2, 11, 2, 3, 4, dt_max=2.0)]
    fn = lambda *a: selective_scan(*a[:5], initial_state=a[5], return_final_state=True, impl="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs), f"seed {seed}"


@pytest.mark.parametrize("impl", ["auto", *FAST_IMPLS])
def test_bf16_inputs(impl, seed):
    inputs = make_inputs(2, 90, 2, 4, 16, dtype=torch.float32)
    bf = [t.bfloat16() for t in inputs]
    y = selective_scan(*bf[:5], initial_state=bf[5], impl=impl)
    y32 = selective_scan_ref(*[t.float() for t in bf[:5]], initial_state=bf[5].float())  # same rounded inputs
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y32) < 1e-2, f"seed {seed}"
    leaves = [t.clone().requires_grad_() for t in bf]
    selective_scan(*leaves[:5], initial_state=leaves[5], impl=impl).float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in leaves)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_state_update_steps_equal_scan(impl, seed):
    x, dt, A, B, C, s0 = (t.float() for t in make_inputs(2, 40, 3, 4, 16))
    y_scan, s_scan = selective_scan(x, dt, A, B, C, initial_state=s0, return_final_state=True, impl=impl)
    state = s0.clone()
    ys = [selective_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t]) for t in range(x.shape[1])]
    assert rel_err(torch.stack(ys, 1), y_scan) < 1e-5, f"seed {seed}"
    assert rel_err(state, s_scan) < 1e-5, f"seed {seed}"


def test_state_update_dtype_and_in_place(seed):
    x, dt, A, B, C, _ = make_inputs(2, 1, 3, 4, 8, dtype=torch.float32)
    state = torch.randn(2, 3, 4, 8)
    before, ptr = state.clone(), state.data_ptr()
    y = selective_state_update(state, x[:, 0].bfloat16(), dt[:, 0].bfloat16(), A, B[:, 0], C[:, 0])
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 4)
    assert state.data_ptr() == ptr and state.dtype == torch.float32 and not torch.equal(state, before)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_prefill_continuation(impl, seed):
    """Scanning [0, t) and then [t, T) from the first half's final state equals scanning [0, T)."""
    x, dt, A, B, C, s0 = (t.float() for t in make_inputs(2, 150, 2, 4, 16))
    y_all, s_all = selective_scan(x, dt, A, B, C, initial_state=s0, return_final_state=True, impl=impl)
    cut = 77
    y1, s1 = selective_scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], s0, True, impl=impl)
    y2, s2 = selective_scan(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], s1, True, impl=impl)
    assert rel_err(torch.cat([y1, y2], 1), y_all) < 1e-5, f"seed {seed}"
    assert rel_err(s2, s_all) < 1e-5, f"seed {seed}"


def test_bad_shapes_and_impls_are_rejected():
    x, dt, A, B, C, s0 = make_inputs(2, 5, 2, 3, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x, dt, A[:, :2], B, C)
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(x, dt, A, B, C, initial_state=s0[:1])
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_scan(x, dt, A, B, C, impl="fast")
    with pytest.raises(ValueError, match="impl='cuda'"):
        selective_scan(x, dt, A, B, C, impl="cuda")


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_non_contiguous_inputs(impl, seed):
    """The mixer passes slices of one projection; strides must not matter."""
    Bsz, T, H, P, N = 2, 40, 2, 4, 8
    proj = torch.randn(Bsz, T, 2 * H * P + 2 * H * N)
    x, dt, B, C = proj.split([H * P, H * P, H * N, H * N], dim=-1)
    x, dt = x.unflatten(-1, (H, P)), F.softplus(dt.unflatten(-1, (H, P)))
    B, C = B.unflatten(-1, (H, N)), C.unflatten(-1, (H, N))
    A = -torch.arange(1.0, N + 1).expand(H, P, N)  # stride 0 over H and P
    assert not x.is_contiguous() and not B.is_contiguous()
    assert rel_err(selective_scan(x, dt, A, B, C, impl=impl), selective_scan_ref(x, dt, A, B, C)) < 1e-5, seed


@pytest.mark.skipif(not scan.cpu_kernel_available(), reason="CPU kernel did not build here")
def test_kernel_builds_once_under_concurrent_processes(tmp_path):
    """Three processes compile into the same empty cache at once: all load a kernel, one library remains."""
    code = "from h1rl.models import scan_kernel as m; print(m.cpu_kernel_available())"
    env = dict(os.environ, H1RL_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == [b"True"] * 3
    libs = list(tmp_path.glob("kernels/*/*"))
    assert [p.name for p in libs] == ["h1rl_scan.so"], libs


@pytest.mark.skipif(not scan.cpu_kernel_available(), reason="CPU kernel did not build here")
def test_kernel_source_is_package_data_and_keys_the_cache(monkeypatch, tmp_path):
    """The C source comes from h1rl/models/csrc/ (as installed); an edit to it builds a new library beside the old."""
    source = scan_kernel._c_source()
    assert "int h1_scan_fwd(" in source and "int h1_scan_bwd(" in source
    monkeypatch.setenv("H1RL_CACHE_DIR", str(tmp_path))
    scan_kernel._cpu_kernel.cache_clear()
    try:
        assert scan.cpu_kernel_available()
        monkeypatch.setattr(scan_kernel, "_c_source", lambda: source + "\n/* edited */\n")
        scan_kernel._cpu_kernel.cache_clear()
        assert scan.cpu_kernel_available()
        assert len(list(tmp_path.glob("kernels/*/h1rl_scan.so"))) == 2
    finally:
        scan_kernel._cpu_kernel.cache_clear()


def test_missing_gcc_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(scan_kernel.shutil, "which", lambda name: None)
    monkeypatch.setenv("H1RL_CACHE_DIR", str(tmp_path / "empty"))
    scan_kernel._cpu_kernel.cache_clear()
    try:
        x, dt, A, B, C, _ = make_inputs(1, 9, 2, 3, 4, dtype=torch.float32)
        with caplog.at_level("WARNING", logger=scan_kernel.__name__):
            for impl in ("auto", "cpu_kernel"):
                y = selective_scan(x, dt, A, B, C, impl=impl)
                assert rel_err(y, selective_scan_ref(x, dt, A, B, C)) < 1e-5
        assert len(caplog.records) == 1 and "gcc" in caplog.records[0].getMessage()
    finally:
        scan_kernel._cpu_kernel.cache_clear()


def test_kernel_disabled_by_env_falls_back(monkeypatch, tmp_path):
    """H1RL_DISABLE_CPU_KERNEL=1 means no compilation and the torch path; results are unchanged."""
    monkeypatch.setenv("H1RL_DISABLE_CPU_KERNEL", "1")
    monkeypatch.setenv("H1RL_CACHE_DIR", str(tmp_path))
    scan_kernel._cpu_kernel.cache_clear()
    try:
        assert not scan.cpu_kernel_available()
        x, dt, A, B, C, _ = make_inputs(1, 9, 2, 3, 4, dtype=torch.float32)
        torch.testing.assert_close(
            selective_scan(x, dt, A, B, C, impl="cpu_kernel"), selective_scan_ref(x, dt, A, B, C)
        )
        assert not any(tmp_path.iterdir())
    finally:
        scan_kernel._cpu_kernel.cache_clear()


@pytest.mark.parametrize("shape", [(2, 1, 3, 5, 4), (1, 40, 2, 3, 7), (2, 33, 3, 4, 16)])
def test_prepended_state_steps_continue_a_state(shape, seed):
    """A scan from zero over `prepend_state_steps` + the sequence equals the scan from the initial state: outputs
    (its last T), final state, and the gradients of every input, the initial state and A included (float64)."""
    N = shape[-1]
    inputs = make_inputs(*shape)
    dy, dsT = torch.randn(*shape[:4], dtype=torch.float64), torch.randn(shape[0], *shape[2:], dtype=torch.float64)

    def via_prefix(x, dt, A, B, C, initial_state, return_final_state):
        xs, dts, Bs, Cs = scan.prepend_state_steps(x, dt, A, B, C, initial_state)
        y, sT = selective_scan_ref(xs, dts, A, Bs, Cs, return_final_state=True)
        return y[:, N:], sT

    got = run(via_prefix, inputs, dy, dsT)
    ref = run(selective_scan_ref, inputs, dy, dsT)
    names = ["y", "sT", "x", "dt", "A", "B", "C", "s0"]
    for a, b, name in zip(got[:2] + tuple(got[2]), ref[:2] + tuple(ref[2]), names):
        assert rel_err(a, b) < 1e-9, f"{name} (seed {seed})"


class StandInKernel:
    """mamba-ssm's `selective_scan_fn` (u, delta (b, D, L); A (D, N); B, C (b, G, N, L)), computed on CPU by the
    reference scan; records the sequence length of every call."""

    def __init__(self):
        self.lengths = []

    def __call__(self, u, delta, A, B, C, delta_softplus=False, return_last_state=False):
        assert not delta_softplus and return_last_state
        b, D, L = u.shape
        G, N = B.shape[1], B.shape[2]
        H, P = G, D // G
        self.lengths.append(L)
        y, sT = selective_scan_ref(u.transpose(1, 2).reshape(b, L, H, P), delta.transpose(1, 2).reshape(b, L, H, P),
                                   A.reshape(H, P, N), B.permute(0, 3, 1, 2), C.permute(0, 3, 1, 2),
                                   return_final_state=True)
        return y.reshape(b, L, D).transpose(1, 2), sT.reshape(b, D, N)


def test_cuda_dispatch_with_the_kernel_stood_in(monkeypatch):
    """With mamba-ssm's kernel available (stood in on CPU), a fresh state runs the kernel as is, and a continuation
    (the rollout's later prefill chunks) runs it over N prepended steps; both equal the torch scan. Through the
    model: a fresh cache's first chunk is a plain kernel call, the next chunk a continuation."""
    kernel = StandInKernel()
    monkeypatch.setattr(scan, "_mamba_scan_fn", kernel)
    monkeypatch.setattr(scan, "_is_cuda", lambda x: True)
    x, dt, A, B, C, s0 = make_inputs(2, 9, 3, 4, 8, dtype=torch.float32)
    y, sT = selective_scan(x, dt, A, B, C, return_final_state=True)
    y_torch, sT_torch = selective_scan(x, dt, A, B, C, return_final_state=True, impl="torch")
    assert kernel.lengths == [9] and rel_err(y, y_torch) < 1e-5 and rel_err(sT, sT_torch) < 1e-5
    y, sT = selective_scan(x, dt, A, B, C, initial_state=s0, return_final_state=True)
    y_torch, sT_torch = selective_scan(x, dt, A, B, C, initial_state=s0, return_final_state=True, impl="torch")
    assert kernel.lengths[-1] == 8 + 9 and rel_err(y, y_torch) < 1e-5 and rel_err(sT, sT_torch) < 1e-5

    from conftest import tiny_model

    model = tiny_model(["m2", "t"])  # d_state 8
    ids = torch.randint(1, 97, (2, 10))
    kernel.lengths.clear()
    cache = model.allocate_cache(2, 10)
    with torch.no_grad():
        model(ids[:, :6], cache=cache, use_cache=True)  # fresh cache: no initial state
        chunked = model(ids[:, 6:], cache=cache, use_cache=True).logits
        whole = model(ids).logits[:, 6:]
    assert kernel.lengths == [6, 8 + 4, 10]
    assert (chunked - whole).abs().max() <= 1e-5
