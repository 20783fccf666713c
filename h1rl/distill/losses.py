"""Knowledge-distillation losses: reverse / forward KL at a temperature, a cross-entropy mix, hidden-state alignment.

Written by hand because the memory contract matters: the vocabulary is large (131k for Apriel-H1) and neither
transformers nor TRL offers a KD loss that avoids materialising both models' full `(B, T, V)` logits. Here the
models return final hidden states `(B, T, D)` only, and `distill_loss` walks the sequence in chunks of C positions:
each chunk's student and teacher logits are computed in float32, reduced to sums, and freed; under autograd each chunk
runs inside `torch.utils.checkpoint`, so only the chunk's hidden states are kept for backward and its logits are
recomputed then. At no time do two full `(B, T, V)` float32 tensors exist (a test measures what autograd keeps).

Memory contract of one chunk. `_chunk_sums` keeps at most `chunk_temporaries(config)` float32 `(B, C, V)` tensors
alive at once, forward and backward (3; 4 with a cross-entropy mix at a temperature != 1), counted in its body and
measured by tests/distill/test_losses.py. The chunk length C is the most positions for which they fit in
`LossConfig.chunk_bytes` (`chunk_length`), with B the *configured* rows per micro-batch, so that every process runs the
same number of chunks, each calling both LM heads, as DeepSpeed ZeRO-3 requires. Apriel-H1-15B at B = 8 and
V = 131072: 12 MiB per position, so the default 1 GiB budget gives chunks of 85 positions (97 chunks at 8k tokens);
the previous layout of 256 positions kept 7 such tensors, 7 GiB. Not counted: the LM head's weight gradient `(V, D)`
made in each chunk's backward, whatever C.

What makes it 3: the teacher's side runs under no_grad with in-place ops; the student's log-probs feed
`_LogProbKL`, which computes the per-position KL and, in the same pass, its derivative with respect to those
log-probs (in the teacher's buffer), so backward needs that one saved tensor and no autograd graph through
`exp`, `sub` and `mul`; at temperature 1 the cross-entropy reads the same log-probs. `token_kl` is the plain
reference of the same formula; tests compare the two (values and gradients).

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
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from h1rl.distill.config import LossConfig

FLOAT32_BYTES = 4


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float = 1.0):
    """Per-position KL (..., V) x (..., V) -> (...) in float32, times temperature^2 (see the module docstring).

    The plain reference: `distill_loss` computes the same with fewer temporaries (`_LogProbKL`)."""
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


def chunk_temporaries(config: LossConfig) -> int:
    """Float32 `(B, C, V)` tensors that `_chunk_sums` keeps alive at once at its peak (forward or backward)."""
    return 4 if config.ce_weight > 0 and config.temperature != 1 else 3


def chunk_length(config: LossConfig, rows: int, vocab: int) -> int:
    """Positions per chunk: `config.chunk_size` when set, else the most whose temporaries fit in `config.chunk_bytes`.

    `rows` must be equal on every process (the configured per-device batch size, not this micro-batch's rows), so
    that the number of chunks is too (DeepSpeed ZeRO-3)."""
    if config.chunk_size is not None:
        return config.chunk_size
    per_position = chunk_temporaries(config) * rows * vocab * FLOAT32_BYTES
    if per_position > config.chunk_bytes:
        raise ValueError(
            f"loss.chunk_bytes: {config.chunk_bytes} bytes cannot hold one position of {rows} rows x {vocab} "
            f"logits ({chunk_temporaries(config)} float32 temporaries: {per_position} bytes); raise it"
        )
    return config.chunk_bytes // per_position


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., V) . (..., V) -> (...), as a batched matrix product (no (..., V) product tensor)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]


class _LogProbKL(torch.autograd.Function):
    """Per-position KL (B, C) and, optionally, cross-entropy (B, C) from student log-probs `s` (B, C, V) and teacher
    log-probs `t` (B, C, V) (no grad; its buffer is overwritten). Forward also computes the KL's derivative with
    respect to `s` and saves it as the only `(B, C, V)` tensor; backward scales it in place:

        reverse: d/ds sum_v e^s (s - t) = e^s (s - t + 1)        forward: d/ds sum_v e^t (t - s) = -e^t
        cross-entropy -s[target]: -1 at the target

    (`F.log_softmax`'s backward then turns these into gradients of the logits.)"""

    @staticmethod
    def forward(ctx, s, t, targets, kind: str, with_ce: bool):
        if kind == "reverse_kl":
            diff = t.neg_().add_(s)  # (B, C, V) log p_s - log p_t, in t's buffer
            p = s.exp()  # (B, C, V) p_s
            kl = _rowdot(p, diff)  # (B, C)
            grad = diff.add_(1).mul_(p)  # (B, C, V) dkl/ds, in t's buffer
        elif kind == "forward_kl":
            p = t.exp()  # (B, C, V) p_t
            kl = _rowdot(p, t.sub_(s))  # (B, C)
            grad = p.neg_()  # (B, C, V) dkl/ds
        else:
            raise ValueError(f"unknown KL kind {kind!r}; use reverse_kl or forward_kl")
        del p
        ce = -s.gather(-1, targets[..., None])[..., 0] if with_ce else torch.zeros_like(kl)  # (B, C)
        ctx.save_for_backward(grad, targets)
        ctx.with_ce, ctx.used = with_ce, False
        return kl, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl, grad_ce):  # (B, C), (B, C)
        if ctx.used:
            raise RuntimeError("the chunked KD loss cannot be backpropagated twice (its saved gradient is reused)")
        ctx.used = True
        grad, targets = ctx.saved_tensors
        grad.mul_(grad_kl[..., None])
        if ctx.with_ce:
            grad.scatter_add_(-1, targets[..., None], -grad_ce[..., None])
        return grad, None, None, None, None


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
    """Weighted sums of the KL and the cross-entropy over one chunk; logits live only inside this call.

    Float32 (B, C, V) tensors alive at once (the `[n]` counts below; the peak is 3, 4 with a cross-entropy at a
    temperature != 1; a bf16 head adds its bf16 output, half a tensor, while it is cast)."""
    z = student_head(student_hidden).float()  # (B, C, V) student logits  [1]
    ce = None
    if with_ce and temperature != 1:  # the cross-entropy is at temperature 1: its own log-probs, kept for backward
        ce = F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)  # (B, C)  [+1]
    s = F.log_softmax(z if temperature == 1 else z / temperature, dim=-1)  # (B, C, V) log p_s  [3: z, z / tau, s]
    del z  # [1: s]
    with torch.no_grad():
        t = teacher_head(teacher_hidden).float()  # (B, C, V) teacher logits  [2]
        t = torch.log_softmax(t.div_(temperature) if temperature != 1 else t, dim=-1)  # log p_t  [3, then 2]
    kl, ce_s = _LogProbKL.apply(s, t, targets, kind, with_ce and temperature == 1)  # [3: s, t, p; then s, grad]
    del s, t  # backward: s and grad saved, plus the logits' gradient from log_softmax's backward  [3]
    kl = (kl * weights).sum() * temperature**2
    if not with_ce:
        return kl, kl.new_zeros(())
    return kl, ((ce if ce is not None else ce_s) * weights).sum()


def distill_loss(
    student_hidden: torch.Tensor,  # (B, T, D) final (normed) hidden states
    teacher_hidden: torch.Tensor,  # (B, T, D')
    student_head: nn.Linear,  # the student's lm_head: (..., D) -> (..., V)
    teacher_head: nn.Linear,
    labels: torch.Tensor,  # (B, T), -100 where a token is not a target
    config: LossConfig,
    pad_length: int | None = None,
    rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """`{"loss", "kl", "ce", "tokens"}`: the KL (and CE mix) averaged over target positions, chunk by chunk.

    Chunks of `chunk_length(config, rows, V)` positions. `pad_length` and `rows` make the number of chunks (each one
    calls both heads) equal on every process whatever its batch, as DeepSpeed ZeRO-3's parameter gathering requires:
    the chunks walk `max(T, pad_length)` positions (the extra ones empty), and their length is sized for `rows` rows
    (the configured per-device batch size; default this batch's B, right only when every process's batch has the
    same shape). A batch of more than `rows` rows is an error: its chunks would overrun `config.chunk_bytes`.
    """
    B, T, _ = student_hidden.shape
    vocab = student_head.out_features
    if teacher_head.out_features != vocab:
        raise ValueError(f"student and teacher vocabularies differ: {vocab} vs {teacher_head.out_features} logits")
    rows = B if rows is None else rows
    if B > rows:
        raise ValueError(f"the batch has {B} rows but the loss chunks were sized for {rows} (rows=)")
    size = chunk_length(config, rows, vocab)
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
    for start in range(0, max(T, pad_length or 0), size):
        chunk = slice(start, start + size)
        args = (student_hidden[:, chunk], teacher_hidden[:, chunk], targets[:, chunk], weights[:, chunk])
        kl_c, ce_c = checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args)
        kl, ce = kl + kl_c, ce + ce_c
    n = tokens.clamp(min=1)
    kl, ce = kl / n, ce / n
    return {"loss": kl + config.ce_weight * ce, "kl": kl, "ce": ce, "tokens": tokens}


def hidden_alignment(
    student_states: dict[int, torch.Tensor],  # layer i -> its output (B, T, D) (the last layer's: the normed final)
    teacher_states: dict[int, torch.Tensor],
    attention_mask: torch.Tensor | None,  # (B, T) 1 = real token
) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's outputs of the same layers, over real tokens."""
    if student_states.keys() != teacher_states.keys():
        raise ValueError(f"hidden alignment compares the same layers: student {sorted(student_states)}, teacher "
                         f"{sorted(teacher_states)}")
    if not student_states:
        raise ValueError("hidden alignment needs at least one layer (loss.hidden_layers selects none of this model)")
    B, T, D = next(iter(student_states.values())).shape
    device = next(iter(student_states.values())).device
    mask = torch.ones(B, T, device=device) if attention_mask is None else attention_mask.float()
    n = mask.sum().clamp(min=1) * D
    total = 0.0
    for i, state in student_states.items():
        diff = state.float() - teacher_states[i].float()  # (B, T, D)
        total = total + (diff.pow(2).sum(-1) * mask).sum() / n
    return total / len(student_states)
