"""KD losses: each KL variant equals its formula, chunked equals unchunked (values and gradients), memory bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from h1rl.distill.config import LossConfig
from h1rl.distill.losses import distill_loss, hidden_alignment, next_token_targets, token_kl


def direct_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_v p_v log(p_v / q_v), written out in plain Python."""
    return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))


def softmax(xs: list[float], T: float) -> list[float]:
    exps = [math.exp(x / T) for x in xs]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_equals_direct_formula(kind, temperature):
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, dtype=torch.float64) * 2, torch.randn(3, 5, dtype=torch.float64) * 2
    got = token_kl(s, t, kind, temperature)
    for row in range(3):
        ps, pt = softmax(s[row].tolist(), temperature), softmax(t[row].tolist(), temperature)
        expected = direct_kl(ps, pt) if kind == "reverse_kl" else direct_kl(pt, ps)
        assert got[row].item() == pytest.approx(expected * temperature**2, rel=1e-5)
    assert torch.all(token_kl(s, s, kind, temperature).abs() < 1e-6)  # zero for equal distributions


def test_reverse_and_forward_differ():
    s, t = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 1.0]])
    assert not torch.allclose(token_kl(s, t, "reverse_kl"), token_kl(s, t, "forward_kl"))


def test_next_token_targets():
    labels = torch.tensor([[5, 6, -100, 7, -100]])
    targets, weights = next_token_targets(labels)
    assert targets.tolist() == [[6, 0, 7, 0, 0]]
    assert weights.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]


def setup(B=2, T=11, D=8, V=13, seed=0):
    torch.manual_seed(seed)
    s_head, t_head = nn.Linear(D, V, bias=False), nn.Linear(D, V, bias=False)
    h_s = torch.randn(B, T, D, requires_grad=True)
    h_t = torch.randn(B, T, D)
    labels = torch.randint(0, V, (B, T))
    labels[0, 7:] = -100  # right padding of row 0
    labels[1, :3] = -100  # a prompt without loss
    return h_s, h_t, s_head, t_head, labels


def test_loss_matches_full_logits_formula():
    h_s, h_t, s_head, t_head, labels = setup()
    cfg = LossConfig(kind="forward_kl", temperature=2.0, ce_weight=0.3, chunk_size=4)
    parts = distill_loss(h_s, h_t, s_head, t_head, labels, cfg)
    s, t = s_head(h_s), t_head(h_t)
    targets, w = next_token_targets(labels)
    kl = (token_kl(s, t, "forward_kl", 2.0) * w).sum() / w.sum()
    ce = F.cross_entropy(s[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(kl.item() + 0.3 * ce.item(), rel=1e-5)
    assert parts["tokens"].item() == w.sum().item() == (labels[:, 1:] != -100).sum().item()


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_chunked_equals_unchunked(kind):
    results = []
    for chunk, pad_length in ((100, None), (3, None), (4, 40)):  # 40: empty chunks past the end change nothing
        h_s, h_t, s_head, t_head, labels = setup()
        cfg = LossConfig(kind=kind, temperature=1.5, ce_weight=0.5, chunk_size=chunk)
        parts = distill_loss(h_s, h_t, s_head, t_head, labels, cfg, pad_length=pad_length)
        parts["loss"].backward()
        results.append((parts["loss"].detach(), h_s.grad.clone(), s_head.weight.grad.clone()))
        assert t_head.weight.grad is None  # the teacher gets no gradient
    for loss, grad_h, grad_w in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad_h, results[0][1])
        torch.testing.assert_close(grad_w, results[0][2])


def saved_floats(fn) -> int:
    """Elements of every tensor autograd saves for backward while `fn` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_chunks_never_hold_full_logits():
    B, T, D, V = 2, 64, 8, 500
    h_s, h_t, s_head, t_head, labels = setup(B, T, D, V)
    full = B * T * V

    def naive():  # full logits of both models, then the KL
        return (token_kl(s_head(h_s), t_head(h_t), "reverse_kl") * next_token_targets(labels)[1]).sum()

    assert saved_floats(naive) > full  # autograd keeps at least one full (B, T, V) tensor
    for chunk in (8, T):  # checkpointed chunks: autograd keeps the hidden states only, logits are recomputed
        cfg = LossConfig(ce_weight=1.0, chunk_size=chunk)
        assert saved_floats(lambda cfg=cfg: distill_loss(h_s, h_t, s_head, t_head, labels, cfg)) < full / 10


def test_hidden_alignment():
    torch.manual_seed(0)
    s = tuple(torch.randn(2, 3, 4) for _ in range(4))
    t = tuple(torch.randn(2, 3, 4) for _ in range(4))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    m = mask[..., None].float()
    expected = sum(((s[i + 1] - t[i + 1]) ** 2 * m).sum() / (m.sum() * 4) for i in (0, 2)) / 2
    assert hidden_alignment(s, t, [0, 2], mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert hidden_alignment(s, s, [0, 1, 2], mask).item() == 0.0
    with pytest.raises(ValueError, match="same depth"):
        hidden_alignment(s, t[:3], [0], mask)
