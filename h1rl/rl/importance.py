"""Sampler/trainer mismatch correction: truncated or masked importance sampling, with TRL's semantics.

The rollout engine samples a completion and reports each token's log-prob under the *sampling* computation (the
recurrent decode step, its kernels and its dtype); the trainer scores the same tokens with its parallel forward.
In float32 the two agree to about 1e-5 nats; in bfloat16 they do not (0.02 nats on average on a tiny hybrid on CPU,
more with GPU kernels), so the completions come from a slightly different policy than the one being optimised.
TRL corrects for this when vLLM samples (`GRPOTrainer._generate_and_score_completions`, TRL 1.16): it multiplies each
token's loss by a ratio pi_old / pi_sampler, capped. Here the engine plays vLLM's role and the same settings apply
(`GRPOConfig.vllm_importance_sampling_mode`, `vllm_importance_sampling_clip_max`, `vllm_importance_sampling_clip_min`):

- ratio = exp(old_logps - sampling_logps) per token (`token_*` modes, shape (R, L)), or exp of its sum over the
  completion mask per row (`sequence_*` modes, shape (R, 1)); padding and NaN sampling log-probs count as 0;
- `*_truncate`: clamp(ratio, clip_min, clip_max); `*_mask`: ratios outside [clip_min, clip_max] set to 0 (a missing
  bound is no bound).

`mismatch_metrics` returns TRL's `sampling/*` metrics, gathered across processes by the `gather` it is given.
`HybridGRPOTrainer` (h1rl/rl/trainer.py) decides when the correction runs and applies the ratio to the loss.

>>> old, sampled = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, -9.0]])
>>> mask = torch.tensor([[1, 1, 0]])  # the third column is padding
>>> importance_sampling_ratio(old, sampled, mask, "token_truncate", clip_max=1.5)
tensor([[1.5000, 0.3679, 1.0000]])
>>> importance_sampling_ratio(old, sampled, mask, "sequence_mask", clip_max=3.0)
tensor([[0.6065]])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from trl.trainer.utils import nanmax, nanmin

IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_sampling_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
) -> torch.Tensor:
    """The capped ratio pi_old / pi_sampler that TRL multiplies each token's loss by (see the module docstring).

    `old_logps`, `sampling_logps` (R, L): the trainer's and the sampler's log-probs of the completion tokens;
    `mask` (R, L): 1 on the tokens the loss counts (completion mask, times TRL's tool mask if any).
    Returns (R, L) for `token_*` modes and (R, 1) for `sequence_*` modes.
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        modes = ", ".join(IMPORTANCE_SAMPLING_MODES)
        raise ValueError(f"vllm_importance_sampling_mode: {mode!r} is not one of {modes}")
    if old_logps.shape != sampling_logps.shape or old_logps.shape != mask.shape:
        raise ValueError(f"old log-probs {tuple(old_logps.shape)}, sampling log-probs {tuple(sampling_logps.shape)} "
                         f"and mask {tuple(mask.shape)} must have the same (rows, completion length) shape")
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)  # (R, L): NaN (unscored) -> ratio 1
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)  # (R, 1)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is None and clip_max is None:
            raise ValueError(f"vllm_importance_sampling_mode {mode!r} needs vllm_importance_sampling_clip_max or "
                             "vllm_importance_sampling_clip_min")
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def mismatch_metrics(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    ratio: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.reshape(1),
) -> dict[str, float]:
    """TRL's `sampling/*` metrics of one batch, as its vLLM branch logs them every step.

    `old_logps`, `sampling_logps`, `mask` (R, L) and `mode` as in `importance_sampling_ratio`, `ratio` its result.
    Each process reduces its own tokens (|old - sampling| over the masked tokens, NaN skipped; the ratio over the
    masked tokens, or over every row in `sequence_*` modes; 0 where there is nothing to reduce) and `gather`
    (`accelerator.gather` in the trainer: one value per process) combines them as TRL does: mean of the processes'
    means, max of maxima, NaN-skipping min / mean / max of the ratio statistics.
    """
    mask = mask.bool()  # (R, L)
    delta = (old_logps - sampling_logps).abs()  # (R, L)
    delta = delta[mask & ~torch.isnan(delta)]  # (n,)
    flat = ratio.flatten() if mode.startswith("sequence") else ratio[mask]  # (R,) or (n,)
    zero = delta.new_zeros(())

    def reduce(t: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return op(t) if t.numel() > 0 else zero

    gathered = {
        "delta_mean": gather(reduce(delta, torch.mean)),
        "delta_max": gather(reduce(delta, torch.max)),
        "ratio_min": gather(reduce(flat, torch.min).to(zero.dtype)),
        "ratio_mean": gather(reduce(flat, torch.mean).to(zero.dtype)),
        "ratio_max": gather(reduce(flat, torch.max).to(zero.dtype)),
    }
    return {
        "sampling/sampling_logp_difference/mean": gathered["delta_mean"].mean().item(),
        "sampling/sampling_logp_difference/max": gathered["delta_max"].max().item(),
        "sampling/importance_sampling_ratio/min": nanmin(gathered["ratio_min"]).item(),
        "sampling/importance_sampling_ratio/mean": gathered["ratio_mean"].nanmean().item(),
        "sampling/importance_sampling_ratio/max": nanmax(gathered["ratio_max"]).item(),
    }
