"""Knowledge-distillation losses: reverse / forward KL at a temperature, a cross-entropy mix, hidden-state alignment.

Written by hand because the memory contract matters: the vocabulary is large (131k for Apriel-H1) and neither
transformers nor TRL offers a KD loss that avoids materialising both models' full `(B, T, V)` logits. Here the
models return final hidden states `(B, T, D)` only, and `distill_loss` walks the sequence in chunks of
`chunk_size` positions: each chunk's student and teacher logits are computed in float32, reduced to sums, and
freed; under autograd each chunk runs inside `torch.utils.checkpoint`, so only the chunk's hidden states are kept
for backward and its logits are recomputed then. At no time do two full `(B, T, V)` float32 tensors exist (a test
measures what autograd keeps).

Definitions, per position t whose next token is a training target (labels[t+1] != -100):

    p_s = softmax(student_logits / tau),  p_t = softmax(teacher_logits / tau)
    reverse_kl = tau^2 * sum_v p_s (log p_s - log p_t)      KL(student || teacher): Apriel-H1's choice (mode-seeking)
    forward_kl = tau^2 * sum_v p_t (log p_t - log p_s)      KL(teacher || student): MambaInLlama / Hinton
    ce         = -log softmax(student_logits)[labels[t+1]]  (tau = 1)

averaged over those positions; `tau^2` keeps gradient sizes comparable across temperatures (Hinton et al.).
`total = kl + ce_weight * ce + hidden_weight * hidden`, where `hidden` is the mean squared error between student and
teacher layer outputs (`hidden_alignment`), averaged over real tokens, model dim and the chosen layers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from h1rl.distill.config import LossConfig


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float = 1.0):
    """Per-position KL (..., V) x (..., V) -> (...) in float32, times temperature^2 (see the module docstring)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "reverse_kl":
        kl = (s.exp() * (s - t)).sum(-1)
    elif kind == "forward_kl":
        kl = (t.exp() * (t - s)).sum(-1)
    else:
        raise ValueError(f"unknown KL kind {kind!r}; use reverse_kl or forward_kl")
    return kl * temperature**2


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T) with -100 = no target -> targets (B, T) (labels shifted left, 0 where none), weights (B, T)."""
    following = torch.full_like(labels, -100)
    following[:, :-1] = labels[:, 1:]
    weights = (following != -100).float()
    return following.clamp(min=0), weights


def _chunk_sums(
    student_hidden: torch.Tensor,  # (B, C, D)
    teacher_hidden: torch.Tensor,  # (B, C, D')
    targets: torch.Tensor,  # (B, C)
    weights: torch.Tensor,  # (B, C)
    student_head: nn.Module,
    teacher_head: nn.Module,
    kind: str,
    temperature: float,
    with_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of the KL and the cross-entropy over one chunk; logits live only inside this call."""
    s = student_head(student_hidden).float()  # (B, C, V)
    with torch.no_grad():
        t = teacher_head(teacher_hidden).float()  # (B, C, V)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"student and teacher vocabularies differ: {s.shape[-1]} vs {t.shape[-1]} logits")
    kl = (token_kl(s, t, kind, temperature) * weights).sum()
    if not with_ce:
        return kl, kl.new_zeros(())
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten(), reduction="none")  # (B*C,)
    return kl, (ce * weights.flatten()).sum()


def distill_loss(
    student_hidden: torch.Tensor,  # (B, T, D) final (normed) hidden states
    teacher_hidden: torch.Tensor,  # (B, T, D')
    student_head: nn.Module,  # the student's lm_head: (..., D) -> (..., V)
    teacher_head: nn.Module,
    labels: torch.Tensor,  # (B, T), -100 where a token is not a target
    config: LossConfig,
    pad_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """`{"loss", "kl", "ce", "tokens"}`: the KL (and CE mix) averaged over target positions, chunk by chunk.

    `pad_length`: walk the chunks of `max(T, pad_length)` positions (the extra ones empty), so that every process
    calls the heads the same number of times whatever its batch length, as DeepSpeed ZeRO-3's parameter gathering
    requires.
    """
    B, T, _ = student_hidden.shape
    targets, weights = next_token_targets(labels)
    tokens = weights.sum()
    fn = functools.partial(
        _chunk_sums,
        student_head=student_head,
        teacher_head=teacher_head,
        kind=config.kind,
        temperature=config.temperature,
        with_ce=config.ce_weight > 0,
    )
    use_checkpoint = torch.is_grad_enabled() and student_hidden.requires_grad
    kl = ce = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(T, pad_length or 0), config.chunk_size):
        chunk = slice(start, start + config.chunk_size)
        args = (student_hidden[:, chunk], teacher_hidden[:, chunk], targets[:, chunk], weights[:, chunk])
        kl_c, ce_c = checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args)
        kl, ce = kl + kl_c, ce + ce_c
    n = tokens.clamp(min=1)
    kl, ce = kl / n, ce / n
    return {"loss": kl + config.ce_weight * ce, "kl": kl, "ce": ce, "tokens": tokens}


def hidden_alignment(
    student_states: tuple[torch.Tensor, ...],  # L+1 tensors (B, T, D): input to layer 0 ... output of the last (normed)
    teacher_states: tuple[torch.Tensor, ...],
    layers: list[int],
    attention_mask: torch.Tensor | None,  # (B, T) 1 = real token
) -> torch.Tensor:
    """Mean squared error between the outputs of `layers` (index i compares states[i + 1]) over real tokens."""
    if len(student_states) != len(teacher_states):
        raise ValueError(
            f"hidden alignment needs the same depth: student has {len(student_states) - 1} layers, teacher "
            f"{len(teacher_states) - 1}"
        )
    if not layers:
        return student_states[-1].new_zeros((), dtype=torch.float32)
    B, T, D = student_states[-1].shape
    mask = torch.ones(B, T, device=student_states[-1].device) if attention_mask is None else attention_mask.float()
    n = mask.sum().clamp(min=1) * D
    total = 0.0
    for i in layers:
        diff = student_states[i + 1].float() - teacher_states[i + 1].float()  # (B, T, D)
        total = total + (diff.pow(2).sum(-1) * mask).sum() / n
    return total / len(layers)
