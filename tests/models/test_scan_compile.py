"""The scan's custom ops (h1rl::selective_scan_fwd / _bwd in h1rl/models/scan.py) under torch.compile and fake tensors:
torch's opcheck of both ops (schema, autograd registration, fake implementations against the real ones: shapes,
dtypes and strides), a compiled m2 mixer against eager (outputs and gradients, in one graph), and a fake-tensor call
that gives the right shapes without running a backend."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import tiny_config
from test_scan import make_inputs
from torch._subclasses.fake_tensor import FakeTensorMode

from h1rl.models import scan
from h1rl.models.mamba import MambaMixer
from h1rl.models.scan import selective_scan

BACKENDS = ["torch", pytest.param("cpu_kernel", marks=pytest.mark.skipif(
    not scan.cpu_kernel_available(), reason="CPU kernel did not build here (gcc missing or disabled)"))]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_pass_opcheck(backend):
    """Fake outputs match the real ones (shapes, dtypes, strides) with and without an initial state, saved states,
    dy or dsT, on a non-contiguous x; autograd is registered; the ops trace under AOTAutograd with dynamic shapes."""
    fwd, bwd = torch.ops.h1rl.selective_scan_fwd.default, torch.ops.h1rl.selective_scan_bwd.default
    for with_state in (True, False):
        inputs = make_inputs(2, 70, 3, 4, 8, with_state=with_state)
        x, dt, A, B, C, s0 = (None if t is None else t.float() for t in inputs)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, P) with T innermost
        for save in (True, False):
            args = [None if t is None else t.clone().requires_grad_(save) for t in (x, dt, A, B, C, s0)]
            torch.library.opcheck(fwd, (backend, *args, save))
        ckpt = fwd(backend, x, dt, A, B, C, s0, True)[2]
        dy = torch.randn_like(x)
        for dy_, dsT in ((dy, None), (None, torch.randn(2, 3, 4, 8)), (dy, torch.randn(2, 3, 4, 8))):
            torch.library.opcheck(bwd, (backend, x, dt, A, B, C, ckpt, dy_, dsT, with_state))


def m2_layer():
    torch.manual_seed(0)
    layer = MambaMixer(tiny_config(["m2"]), layer_idx=0)
    with torch.no_grad():  # non-trivial dt so that the state matters
        layer.dt_proj.bias.uniform_(-3.0, 0.5)
    return layer


def forward_backward(fn, layer, hidden):
    """Output of fn (the layer, or it compiled) and the gradients of the layer's parameters and of the input, for a
    fixed random cotangent."""
    hidden = hidden.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = fn(hidden)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out.detach(), {"input": hidden.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("impl", BACKENDS)
def test_compiled_m2_layer_equals_eager(impl):
    """torch.compile (inductor, fullgraph=False) of an m2 mixer: one graph, no break at the scan; outputs and gradients
    equal eager's. Static shapes: inductor fails on a dynamic length in torch 2.13 (see scan.py's docstring)."""
    layer = m2_layer()
    layer.scan_impl = impl
    hidden = torch.randn(2, 37, layer.hidden_size)
    out_eager, grads_eager = forward_backward(layer, layer, hidden)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=False, dynamic=False)
    out, grads = forward_backward(compiled, layer, hidden)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: the scan broke the graph"
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_compiled_m2_layer_with_dynamic_length(impl):
    """Two lengths through one compiled mixer (AOTAutograd without inductor): the second call runs a graph with a
    symbolic length, through the ops' fake implementations; both equal eager."""
    layer = m2_layer()
    layer.scan_impl = impl
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter)
    for T in (37, 50):
        hidden = torch.randn(2, T, layer.hidden_size)
        out_eager, grads_eager = forward_backward(layer, layer, hidden)
        out, grads = forward_backward(compiled, layer, hidden)
        torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
        for name, grad in grads_eager.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=f"grad of {name}, T={T}")
    assert counter.frame_count == 2  # the static first graph, then one with a symbolic length


@pytest.mark.parametrize("impl", ["auto", *BACKENDS])
def test_fake_tensor_scan_runs_no_backend(impl, monkeypatch):
    """Under FakeTensorMode the scan (forward and backward) gives the real shapes and dtypes from the fake
    implementations: the backends, replaced by functions that raise, never run."""

    def must_not_run(*args):
        raise AssertionError("a scan backend ran on fake tensors")

    monkeypatch.setattr(scan, "_BACKENDS", dict.fromkeys(scan._BACKENDS, (must_not_run, must_not_run)))
    Bsz, T, H, P, N = 4, 512, 32, 16, 16
    with FakeTensorMode():
        x, dt = (torch.randn(Bsz, T, H, P, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        A = torch.randn(H, P, N, requires_grad=True)
        B, C = (torch.randn(Bsz, T, H, N, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        s0 = torch.randn(Bsz, H, P, N, requires_grad=True)
        y, sT = selective_scan(x, dt, A, B, C, initial_state=s0, return_final_state=True, impl=impl)
        assert (y.shape, y.dtype) == ((Bsz, T, H, P), torch.bfloat16)
        assert (sT.shape, sT.dtype) == ((Bsz, H, P, N), torch.float32)
        (y.float().sum() + sT.sum()).backward()
        for t in (x, dt, A, B, C, s0):
            assert t.grad.shape == t.shape and t.grad.dtype == t.dtype

