"""Token sampling for the rollout engine: settings, logit processing, and the log-probs handed to the trainer.

`SamplingParams` carries the usual knobs (temperature, top-k, top-p, min-p, repetition penalty, stop tokens, seed).
`sample_next` draws one token per row and returns its log-prob under the *policy the trainer optimises*:
`log_softmax(logits / temperature)`, before truncation (top-k/p, min-p) and repetition penalty. That is the
quantity TRL's GRPO recomputes with a full forward pass (it scales logits by the temperature and applies nothing
else), so rollout and training log-probs agree; truncation and penalties change only which token is drawn.
Greedy decoding (temperature 0) returns `log_softmax(logits)` of the argmax token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to draw completions. Defaults match `model.generate(do_sample=True)` with no processors."""

    max_new_tokens: int = 256  # completion length cap; a row that reaches it finishes with reason "length"
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 1.0  # nucleus sampling: smallest set with cumulative probability >= top_p (1: off)
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token) (0: off)
    repetition_penalty: float = 1.0  # CTRL-style penalty on tokens already in the prompt or completion (1: off)
    stop_token_ids: list[int] = field(default_factory=list)  # a row finishes (reason "stop") after emitting one
    seed: int | None = None  # seeds the sampler; None draws a fresh seed from torch's global generator
    # Sharded rollouts: the seeded stream draws `stream_rows` uniforms per step and this call's rows use those from
    # `stream_offset` on. Processes that split one global batch (same seed, offset = rows before theirs) then sample
    # exactly what a single process sampling the whole batch would. None: the stream is this call's own rows.
    stream_rows: int | None = None
    stream_offset: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.stream_offset < 0 or (self.stream_rows is not None and self.stream_rows < 1):
            raise ValueError(f"stream_rows must be >= 1 and stream_offset >= 0, got {self.stream_rows}, "
                             f"{self.stream_offset}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (n, V), history (n, S) token ids (pad ids included are harmless only if pad never scores): as HF."""
    score = logits.gather(1, history)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, history, score)


def truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply top-k, top-p and min-p to temperature-scaled logits (n, V): dropped tokens get -inf."""
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        threshold = params.min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,  # (n, V) last-position logits, any float dtype
    params: SamplingParams,
    uniforms: torch.Tensor | None,  # (n,) one U(0, 1) draw per row (unused when greedy)
    history: torch.Tensor | None = None,  # (n, S) ids seen so far, for the repetition penalty
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (tokens (n,), log-probs (n,) float32 under the unprocessed policy).

    Sampling is by inverse CDF with one uniform per row, so a row's draw depends only on its own uniform: the
    engine can drop finished rows from the batch without changing what the others sample under a fixed seed.
    """
    logits = logits.float()
    temperature = params.temperature if not params.greedy else 1.0
    policy_logprobs = torch.log_softmax(logits / temperature, dim=-1)  # (n, V)
    processed = logits
    if params.repetition_penalty != 1.0 and history is not None:
        processed = apply_repetition_penalty(processed, history, params.repetition_penalty)
    if params.greedy:
        tokens = processed.argmax(-1)
    else:
        processed = truncate(processed / temperature, params)
        cdf = processed.softmax(-1).cumsum(-1)  # (n, V)
        target = (uniforms * cdf[:, -1]).unsqueeze(-1)  # (n, 1)
        tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    return tokens, policy_logprobs.gather(1, tokens[:, None])[:, 0]
