"""Token sampling for the rollout engine: settings, logit processing, and the log-probs handed to the trainer.

`SamplingParams` carries the usual knobs (temperature, top-k, top-p, min-p, repetition penalty, stop tokens, seed).
`next_token_probs` turns last-position logits into the next-token distribution exactly as transformers' `generate`
does (TRL's non-vLLM path: `model.generate` with a GenerationConfig carrying these settings), in transformers' order
(`GenerationMixin._get_logits_processor`, transformers 5.24), all in float32 with -inf for dropped tokens:

1. repetition penalty (`RepetitionPenaltyLogitsProcessor`): every id in the history scores `l / penalty` if `l >= 0`
   and `l * penalty` if `l < 0`, once however often it occurs. Ids outside [0, V) are ignored, which is how a caller
   leaves out prompt padding: `generate` skips a prompt's left padding (its `prompt_ignore_length`, read off the
   attention mask), while a pad id inside [0, V) is penalised here like any other id.
2. temperature (`TemperatureLogitsWarper`): `l / temperature`.
3. top-k (`TopKLogitsWarper`): drop tokens below the k-th largest score; ties with it are kept; k >= V is off.
4. top-p (`TopPLogitsWarper`): sort ascending, drop tokens whose cumulative probability (from the least likely up)
   is <= 1 - top_p; the most likely token is always kept (`min_tokens_to_keep=1`), so the token that crosses top_p
   stays. Probabilities here are those left after top-k.
5. min-p (`MinPLogitsWarper`): drop tokens whose probability (after temperature, top-k and top-p) is below
   min_p * the largest one. The largest always survives since `SamplingParams` keeps min_p < 1.

Steps 2-5 are the sampling warpers; greedy decoding (temperature 0) is `generate(do_sample=False)`: the argmax after
step 1 (first index on ties). Off values skip a step: top_k 0, top_p 1, min_p 0, repetition_penalty 1. Only top-p
sorts the vocabulary, so a step costs at most one sort.

`sample_next` draws one token per row from that distribution by inverse CDF (one uniform per row) and returns its
log-prob under the *policy the trainer optimises*: `log_softmax(logits / temperature)`, before the penalty and the
truncation (top-k/p, min-p). That is the quantity TRL's GRPO recomputes with a full forward pass (it scales logits by
the temperature and applies nothing else), so rollout and training log-probs agree; penalty and truncation change only
which token is drawn. Greedy decoding returns `log_softmax(logits)` of the argmax token.
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
    """logits (n, V), history (n, S) token ids: `RepetitionPenaltyLogitsProcessor`; ids outside [0, V) are ignored."""
    V = logits.shape[-1]
    ids = history.masked_fill((history < 0) | (history >= V), V)  # (n, S) out-of-vocabulary ids -> spare column V
    padded = torch.nn.functional.pad(logits, (0, 1))  # (n, V + 1) a copy, with the spare column
    score = padded.gather(1, ids)  # (n, S)
    padded.scatter_(1, ids, torch.where(score < 0, score * penalty, score / penalty))  # repeats write equal values
    return padded[:, :V]


def truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Top-k, then top-p, then min-p on temperature-scaled logits (n, V), as transformers: dropped tokens get -inf."""
    V = logits.shape[-1]
    if 0 < params.top_k < V:  # TopKLogitsWarper
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:  # TopPLogitsWarper: ascending sort, drop the low tail of mass <= 1 - top_p, keep the top
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)  # (n, V)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - params.top_p  # (n, V)
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if params.min_p > 0:  # MinPLogitsWarper (its keep-the-top step is a no-op for min_p < 1)
        probs = logits.softmax(-1)  # (n, V)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def process_logits(
    logits: torch.Tensor,  # (n, V) last-position logits, any float dtype
    params: SamplingParams,
    history: torch.Tensor | None = None,  # (n, S) ids seen so far, for the repetition penalty
) -> torch.Tensor:
    """The scores (n, V) float32 that transformers samples from (softmax) or takes the argmax of (greedy)."""
    scores = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        scores = apply_repetition_penalty(scores, history, params.repetition_penalty)
    if params.greedy:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    return truncate(scores, params)


def next_token_probs(
    logits: torch.Tensor,  # (n, V)
    params: SamplingParams,
    history: torch.Tensor | None = None,  # (n, S)
) -> torch.Tensor:
    """The distribution (n, V) float32 that `sample_next` draws from: transformers' (see the module docstring).

    Greedy decoding gives one-hot rows on the argmax.
    """
    scores = process_logits(logits, params, history)  # (n, V)
    if params.greedy:
        return torch.zeros_like(scores).scatter_(1, scores.argmax(-1, keepdim=True), 1.0)
    return scores.softmax(-1)


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
    if params.greedy:
        tokens = process_logits(logits, params, history).argmax(-1)  # = next_token_probs(...).argmax(-1)
    else:
        cdf = next_token_probs(logits, params, history).cumsum(-1)  # (n, V)
        target = (uniforms * cdf[:, -1]).unsqueeze(-1)  # (n, 1)
        tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    return tokens, policy_logprobs.gather(1, tokens[:, None])[:, 0]
