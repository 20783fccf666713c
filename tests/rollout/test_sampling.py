"""Sampling: the engine's next-token distribution equals transformers' `generate`, and inverse-CDF draws follow it.

The reference is built by transformers itself: `GenerationMixin._get_logits_processor` on a GenerationConfig with the
settings TRL's non-vLLM path passes (`trl.GRPOTrainer`: temperature, top_k, top_p, min_p, repetition_penalty), called
on an h1rl model (the object TRL calls `generate` on). That checks the order of the processors as well as each one,
and follows transformers if either changes. Greedy is `do_sample=False` (no warpers, then argmax).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig

from h1rl.rollout.sampling import SamplingParams, next_token_probs, sample_next

V = 64


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def transformers_probs(model, logits, params: SamplingParams, history, attention_mask=None) -> torch.Tensor:
    """What `model.generate` samples from (softmax of the processed scores), or one-hot rows when greedy."""
    settings = dict(repetition_penalty=params.repetition_penalty)
    if not params.greedy:  # as trl.GRPOTrainer builds it (min_p None when off, as h1rl's trainer maps it to 0)
        settings.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                        min_p=params.min_p or None)
    config = GenerationConfig(do_sample=not params.greedy, **settings)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    processors = model._get_logits_processor(config, input_ids_seq_length=history.shape[1], device="cpu",
                                             model_kwargs=kwargs)
    scores = processors(history, logits.clone())  # (n, V)
    if params.greedy:
        return torch.zeros_like(scores).scatter_(1, scores.argmax(-1, keepdim=True), 1.0)
    return scores.softmax(-1)


def random_case(seed: int, n: int = 8, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaked random logits (n, V) of both signs and a history (n, 12) with repeats."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, V, generator=g)
    if ties:  # many equal logits, at the top-k and top-p boundaries too
        logits = logits.round()
    return logits, torch.randint(0, V, (n, 12), generator=g)


GRID = list(itertools.product(
    [1.0, 0.7, 1.6],  # temperature
    [0, 1, 5, 40, V, V + 10],  # top_k (0 off; >= V keeps all)
    [1.0, 0.9, 0.5, 0.05],  # top_p (1 off)
    [0.0, 0.05, 0.3],  # min_p (0 off)
    [1.0, 1.3, 0.8],  # repetition_penalty (1 off; < 1 rewards repeats)
))


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_distribution_equals_transformers_generate_over_the_grid(model, ties):
    worst = 0.0
    for i, (temperature, top_k, top_p, min_p, penalty) in enumerate(GRID):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=penalty)
        logits, history = random_case(i, ties=ties)
        ours = next_token_probs(logits, params, history)  # (n, V)
        ref = transformers_probs(model, logits, params, history)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-6, f"{params}: max |p_h1rl - p_transformers| = {diff}"
        assert torch.equal(ours > 0, ref > 0), f"{params}: different supports"
        worst = max(worst, diff)
    print(f"worst difference over {len(GRID)} settings ({'tied' if ties else 'random'} logits): {worst:.3g}")


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_greedy_is_the_argmax_after_the_penalty_as_transformers(model, penalty):
    params = SamplingParams(temperature=0, repetition_penalty=penalty)
    logits, history = random_case(7)
    ours = next_token_probs(logits, params, history)
    assert torch.equal(ours, transformers_probs(model, logits, params, history))
    assert torch.equal(sample_next(logits, params, None, history)[0], ours.argmax(-1))


def test_top_p_comes_before_min_p():
    """Hand-checked: p = [0.5, 0.3, 0.12, 0.08], top_p 0.85, min_p 0.2. transformers: top-p keeps {0.5, 0.3, 0.12}
    (0.5 + 0.3 < 0.85; from the bottom only 0.08 <= 0.15), then min-p keeps tokens >= 0.2 * 0.5 in ratio: all three.
    Min-p first (h1rl's old order) kept {0.5, 0.3, 0.12}, whose top 0.85 (0.782 of the whole) is 0.5 + 0.3: {0.5, 0.3}.
    """
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    probs = next_token_probs(logits, SamplingParams(top_p=0.85, min_p=0.2))[0]
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.12, 0.0]) / 0.92)


def test_history_ids_outside_the_vocabulary_are_ignored_like_generate_skips_left_padding(model):
    """`generate` skips each prompt's left padding (attention mask 0) in the penalty; h1rl skips ids outside [0, V).
    A pad id inside the vocabulary is penalised like any other id (as `RepetitionPenaltyLogitsProcessor` without a
    mask)."""
    pad = 3
    logits, history = random_case(11, n=4)
    history[history == pad] = pad + 1  # the pad id only as padding
    mask = torch.ones_like(history)
    for row, padding in enumerate([0, 2, 5, 11]):
        history[row, :padding], mask[row, :padding] = pad, 0
    logits[:, pad] = 4.0  # a likely pad token, so that penalising it shows
    params = SamplingParams(temperature=0.8, min_p=1e-4, repetition_penalty=1.5)
    marked = history.masked_fill(mask == 0, -1)
    ref = transformers_probs(model, logits, params, history, attention_mask=mask)
    assert (next_token_probs(logits, params, marked) - ref).abs().max() <= 1e-6
    assert (next_token_probs(logits, params, history.masked_fill(mask == 0, V)) - ref).abs().max() <= 1e-6
    penalised = next_token_probs(logits, params, history)  # the pad id counted as seen, in rows 1-3
    assert (penalised[1:, pad] < ref[1:, pad]).all()
    torch.testing.assert_close(penalised, transformers_probs(model, logits, params, history), atol=1e-6, rtol=0)


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.6, top_k=20, top_p=0.8, min_p=0.05),
                                      dict(top_p=0.3, repetition_penalty=1.2), dict(top_k=1)])
def test_inverse_cdf_draws_follow_the_distribution(settings):
    """M rows of the same logits with the uniforms (j + 1/2) / M: the share of draws at or below each token is the
    distribution's CDF to within 1/M, dropped tokens are never drawn, and log-probs are the untruncated policy's."""
    M = 4096
    params = SamplingParams(**settings)
    logits, history = random_case(5, n=1)
    probs = next_token_probs(logits, params, history)[0]  # (V,)
    uniforms = (torch.arange(M) + 0.5) / M  # (M,)
    tokens, logprobs = sample_next(logits.expand(M, V), params, uniforms, history.expand(M, -1))  # (M,), (M,)
    empirical = torch.bincount(tokens, minlength=V).cumsum(0) / M  # (V,)
    assert (empirical - probs.cumsum(0)).abs().max() <= 1 / M + 1e-6
    assert (probs[tokens] > 0).all()
    policy = torch.log_softmax(logits[0] / params.temperature, -1)  # (V,)
    assert torch.equal(logprobs, policy[tokens])
    assert torch.equal(tokens, tokens.sort().values)  # inverse CDF: larger uniforms, later tokens
    first = sample_next(logits.expand(2, V), params, uniforms[[0, -1]], history.expand(2, -1))[0]
    assert first.tolist() == tokens[[0, -1]].tolist()  # a row's draw depends only on its own uniform
