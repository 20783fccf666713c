"""RolloutEngine: greedy == generate, seeded sampling, stops, log-probs == trainer recomputation, prefix sharing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from h1rl.rollout import RolloutBudget, RolloutEngine, SamplingParams
from h1rl.rollout.engine import bytes_per_row
from h1rl.rollout.sampling import truncate

LAYOUTS = {
    "mixed": ["t", "m2", "i", "m2"],
    "no_attention": ["m2", "m2"],
    "no_mamba": ["t", "t"],
    "with_identity": ["i", "m2", "t", "i"],
}


@pytest.fixture(params=list(LAYOUTS))
def model(request):
    return tiny_model(LAYOUTS[request.param])


def random_prompts(lengths: list[int], vocab: int = 97) -> list[list[int]]:
    return [torch.randint(1, vocab, (n,)).tolist() for n in lengths]


def recomputed_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """What a trainer computes: one full forward over prompt + completion, log_softmax(logits / T) of each token."""
    ids = torch.tensor(prompt + completion)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def recomputed_logprobs_left_padded(model, rollout, temperature: float) -> list[torch.Tensor]:
    """The same, but as GRPO does it: all rows in one left-padded batch (prompt) + right-padded completions."""
    comps = rollout.completions()
    ids, mask, Tp = rollout.training_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, Tp - 1 : -1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(2, ids[:, Tp:, None])[..., 0]
    return [lp[r, : len(c)] for r, c in enumerate(comps)]


def test_greedy_equals_generate(model):
    prompts = random_prompts([6, 2, 9])
    out = RolloutEngine(model, pad_token_id=0).generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=0))
    for r, p in enumerate(out.prompt_ids):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(p) :]
        assert out.completion_ids[r].tolist() == ref.tolist(), f"row {r}"


def test_sampling_is_reproducible_under_a_seed_and_varies_without(model):
    engine = RolloutEngine(model, pad_token_id=0)
    prompts = random_prompts([5, 3])
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=1234)
    a, b = engine.generate(prompts, 4, params), engine.generate(prompts, 4, params)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    other = engine.generate(prompts, 4, SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=99))
    assert not torch.equal(a.completion_ids, other.completion_ids)
    # the G completions of one prompt differ from each other
    assert len({tuple(c) for c in a.completions()[:4]}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_full_forward_recomputation(model, temperature):
    prompts = random_prompts([7, 3, 11, 1])
    params = SamplingParams(max_new_tokens=14, temperature=temperature, top_k=30, stop_token_ids=[5, 6, 7], seed=7)
    out = RolloutEngine(model, pad_token_id=0).generate(prompts, 3, params)
    batched = recomputed_logprobs_left_padded(model, out, temperature)
    for r, (p, c) in enumerate(zip(out.prompt_ids, out.completions())):
        got = out.logprobs[r, : len(c)]
        assert (got - recomputed_logprobs(model, p, c, temperature)).abs().max() <= 1e-4, f"row {r} alone"
        assert (got - batched[r]).abs().max() <= 1e-4, f"row {r} in a left-padded batch"
        assert (out.logprobs[r, len(c) :] == 0).all()


def test_stop_tokens_and_length_cap_per_row():
    model = tiny_model()
    engine = RolloutEngine(model, pad_token_id=0)
    # every token but 0 is a stop token for half of the vocabulary: some rows stop early, others run to the cap
    stops = list(range(1, 97, 2))
    params = SamplingParams(max_new_tokens=9, stop_token_ids=stops, seed=3)
    out = engine.generate(random_prompts([4, 4, 4, 4]), 4, params)
    assert {"stop", "length"} <= set(out.finish_reasons) or set(out.finish_reasons) == {"stop"}
    for r, c in enumerate(out.completions()):
        if out.finish_reasons[r] == "stop":
            assert c[-1] in stops and not any(tok in stops for tok in c[:-1])
        else:
            assert len(c) == 9 and not any(tok in stops for tok in c)
        assert (out.completion_ids[r, len(c) :] == 0).all()
    assert out.completion_ids.shape[1] == int(out.lengths.max())


def test_prefix_sharing_equals_prefilling_each_row_separately(model):
    prompts = random_prompts([5, 8])
    params = SamplingParams(max_new_tokens=10, temperature=0)
    engine = RolloutEngine(model, pad_token_id=0)
    shared = engine.generate(prompts, 3, params)
    separate = engine.generate([p for p in prompts for _ in range(3)], 1, params)
    assert torch.equal(shared.completion_ids, separate.completion_ids)
    assert (shared.logprobs - separate.logprobs).abs().max() <= 1e-5


def test_compaction_does_not_change_results():
    model = tiny_model()
    prompts = random_prompts([3, 6, 2])
    params = SamplingParams(max_new_tokens=12, stop_token_ids=list(range(1, 97, 3)), seed=11)
    eager = RolloutEngine(model, pad_token_id=0, compact_fraction=0.0).generate(prompts, 4, params)  # every step
    never = RolloutEngine(model, pad_token_id=0, compact_fraction=2.0).generate(prompts, 4, params)  # never
    assert "stop" in eager.finish_reasons
    assert torch.equal(eager.completion_ids, never.completion_ids)
    assert (eager.logprobs - never.logprobs).abs().max() <= 1e-5


def test_sharded_sampling_equals_one_process_sampling_the_whole_batch():
    """Two "processes" each sampling their half of a seeded stream draw what one process draws for the whole batch
    (as HybridGRPOTrainer does under data parallelism), prompt padding and early stops included."""
    model = tiny_model()
    prompts = random_prompts([4, 7, 3, 6])
    kwargs = dict(max_new_tokens=10, temperature=1.2, stop_token_ids=list(range(1, 97, 5)), seed=2024)
    whole = RolloutEngine(model, pad_token_id=0).generate(prompts, 3, SamplingParams(**kwargs))
    halves = [
        RolloutEngine(model, pad_token_id=0).generate(
            prompts[2 * i : 2 * i + 2], 3, SamplingParams(stream_rows=12, stream_offset=6 * i, **kwargs)
        )
        for i in range(2)
    ]
    assert whole.completions() == halves[0].completions() + halves[1].completions()
    logprobs = [lp[:n] for half in halves for lp, n in zip(half.logprobs, half.lengths.tolist())]
    for row, (lp, n) in enumerate(zip(whole.logprobs, whole.lengths.tolist())):
        assert torch.allclose(lp[:n], logprobs[row], atol=1e-5), f"row {row}"
    assert not torch.equal(halves[0].completion_ids, halves[1].completion_ids)
    with pytest.raises(ValueError, match="do not fit in the sampling stream"):
        params = SamplingParams(stream_rows=8, stream_offset=4, **kwargs)
        RolloutEngine(model, pad_token_id=0).generate(prompts[:2], 3, params)


def test_truncation_keeps_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: torch.isfinite(truncate(logits, SamplingParams(**kw)))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert keep(top_p=0.5) == [True, False, False, False]
    assert keep(min_p=0.2) == [True, True, True, False]  # threshold 0.1


def test_repetition_penalty_discourages_repeats():
    model = tiny_model()
    prompts = random_prompts([6])
    engine = RolloutEngine(model, pad_token_id=0)
    plain = engine.generate(prompts, 1, SamplingParams(max_new_tokens=30, temperature=0))
    penalised = engine.generate(prompts, 1, SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=5.0))
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    assert repeats(penalised.completions()[0]) < repeats(plain.completions()[0]) or repeats(plain.completions()[0]) == 0


def test_bad_inputs_are_named():
    model = tiny_model()
    engine = RolloutEngine(model, pad_token_id=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary \[0, 97\): \[500\]"):
        engine.generate([[1, 500]])
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(TypeError, match="needs an h1rl HybridForCausalLM"):
        RolloutEngine(torch.nn.Linear(2, 2), pad_token_id=0)


@pytest.mark.parametrize("max_rows,prefill_chunk", [(1, 1), (2, 3), (5, 2), (7, 4)])
def test_tight_budget_and_chunked_prefill_equal_an_unbounded_rollout(model, max_rows, prefill_chunk):
    """Rows decoded a few at a time (continuous batching: a finished row's slot goes to the next waiting row) and
    prompts prefilled a few tokens per call give the tokens and log-probs of one unbounded rollout (fp32)."""
    prompts = random_prompts([6, 2, 9, 4])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, stop_token_ids=list(range(1, 97, 8)),
                            repetition_penalty=1.2, seed=21)
    unbounded = RolloutEngine(model, pad_token_id=0).generate(prompts, 3, params)
    budget = RolloutBudget(max_rows=max_rows, prefill_chunk=prefill_chunk)
    tight = RolloutEngine(model, pad_token_id=0, budget=budget).generate(prompts, 3, params)
    assert len(set(unbounded.lengths.tolist())) > 2  # rows finish at different steps: slots are refilled
    assert torch.equal(tight.completion_ids, unbounded.completion_ids)
    assert torch.equal(tight.lengths, unbounded.lengths) and tight.finish_reasons == unbounded.finish_reasons
    assert (tight.logprobs - unbounded.logprobs).abs().max() <= 1e-5
    assert tight.stats["rows_at_once"] == max_rows and unbounded.stats["rows_at_once"] == 12
    assert tight.stats["decode_steps"] > unbounded.stats["decode_steps"]
    assert tight.stats["prompts_prefilled"] == len(prompts)  # a prompt whose rows straddle admissions: once
    assert tight.stats["prefill_calls"] >= -(-9 // prefill_chunk)


def test_memory_budget_sets_the_rows_and_names_itself_when_too_small(monkeypatch):
    import h1rl.rollout.engine as engine_module

    model = tiny_model()
    prompts = random_prompts([5, 3])
    config, dtype_bytes = model.config, 4
    per_row = bytes_per_row(config, 5 + 8, 5, 2048, dtype_bytes, rows_per_prompt=4)  # 2 prompts x 4 rows
    budget = RolloutBudget(memory_gb=3.5 * per_row / 2**30)
    out = RolloutEngine(model, 0, budget=budget).generate(prompts, 4, SamplingParams(max_new_tokens=8, seed=0))
    assert out.stats["rows_at_once"] == 3
    with pytest.raises(ValueError, match=r"rollout budget \(memory_gb=.*\) holds no row: one row of 5 prompt \+ 8"):
        RolloutEngine(model, 0, budget=RolloutBudget(memory_gb=per_row / 2 / 2**30)).generate(
            prompts, 4, SamplingParams(max_new_tokens=8))
    # on CUDA the default is a fraction of the free memory; on CPU there is no limit
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    limit, source = engine_module.memory_budget(RolloutBudget(), torch.device("cuda", 0))
    assert limit == pytest.approx(0.9 * 10 * 2**30) and "free memory" in source
    assert engine_module.memory_budget(RolloutBudget(), torch.device("cpu"))[0] is None
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        RolloutBudget(prefill_chunk=0)


def test_bytes_per_row_counts_the_kv_of_attention_layers_only_and_shares_the_prompt():
    from conftest import tiny_config

    hybrid, teacher = tiny_config(["t", "m2", "m2", "t"]), tiny_config(["t", "t", "t", "t"])
    long_h, long_t = (bytes_per_row(c, 4096 + 1024, 1024, 256, 2) for c in (hybrid, teacher))
    short_h, short_t = (bytes_per_row(c, 1024 + 64, 1024, 256, 2) for c in (hybrid, teacher))
    kv_token = 2 * hybrid.num_key_value_heads * hybrid.head_dim * 2  # one attention layer, bf16
    assert abs((long_t - short_t) - (long_h - short_h) - 2 * kv_token * (4096 - 64)) <= 1  # 2 more attention layers
    alone, shared = bytes_per_row(hybrid, 2048, 1024, 256, 2), bytes_per_row(hybrid, 2048, 1024, 256, 2, 16)
    prompt_kv = 2 * kv_token * 1024  # the prompt's KV in the 2 attention layers, held once per prompt
    assert alone - shared >= prompt_kv * 15 / 16


@pytest.mark.parametrize("budgets", [[3], [1, 2, 4], [0, 5]])
def test_rows_set_aside_and_resumed_equal_one_go(model, budgets):
    """Partial rollouts: under a decode budget the unfinished rows come back "partial"; continued in later calls
    (re-prefilled from their tokens, each with its own uniform stream), every row ends exactly as in one unbounded
    call under the same model (fp32, seeded), with tight slots and prefill chunks too."""
    prompts = random_prompts([6, 2, 9])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=list(range(1, 97, 9)),
                            repetition_penalty=1.1, seed=5)
    whole = RolloutEngine(model, pad_token_id=0).generate(prompts, 3, params)
    engine = RolloutEngine(model, pad_token_id=0, budget=RolloutBudget(max_rows=4, prefill_chunk=3))
    out = engine.generate(prompts, 3, params, decode_budget=budgets[0])
    final = {}  # output row of the one-go call -> (completion, log-probs, reason)
    pending = list(range(9))  # rows of the one-go call still running, in the order of `out`'s rows
    for budget in budgets[1:] + [None]:
        for i, row in enumerate(pending):
            if out.finish_reasons[i] != "partial":
                n = int(out.lengths[i])
                final[row] = (out.completion_ids[i, :n].tolist(), out.logprobs[i, :n], out.finish_reasons[i])
        resumed_rows = [(row, out.resume(i)) for i, row in enumerate(pending) if out.finish_reasons[i] == "partial"]
        if not resumed_rows:
            break
        assert out.resumed_lengths is not None
        pending = [row for row, _ in resumed_rows]
        out = engine.generate([], params=params, resumed=[r for _, r in resumed_rows], decode_budget=budget)
    else:
        for i, row in enumerate(pending):
            n = int(out.lengths[i])
            final[row] = (out.completion_ids[i, :n].tolist(), out.logprobs[i, :n], out.finish_reasons[i])
    assert sorted(final) == list(range(9))
    for row in range(9):
        n = int(whole.lengths[row])
        tokens, logprobs, reason = final[row]
        assert tokens == whole.completion_ids[row, :n].tolist(), f"row {row}"
        assert (logprobs - whole.logprobs[row, :n]).abs().max() <= 1e-5, f"row {row}"
        assert reason == whole.finish_reasons[row]


def test_decode_budget_sets_rows_aside():
    model = tiny_model()
    params = SamplingParams(max_new_tokens=10, seed=1)
    out = RolloutEngine(model, pad_token_id=0, budget=RolloutBudget(max_rows=2)).generate(
        random_prompts([3, 4]), 2, params, decode_budget=2)
    assert out.finish_reasons.count("partial") == 4  # no stop tokens: every row still runs after 2 steps
    assert sorted(out.lengths.tolist()) == [0, 0, 3, 3]  # 2 rows admitted (first token + 2 steps), 2 still waiting
    resumed = out.resume(0)
    assert resumed.completion == out.completion_ids[0, :3].tolist() and resumed.origin == out.origins[0]
    with pytest.raises(ValueError, match="already has 10 tokens"):
        RolloutEngine(model, 0).generate([], params=params, resumed=[type(resumed)([1], [2] * 10, [0.0] * 10,
                                                                                 resumed.origin)])


def test_finished_rows_are_reported_while_the_others_decode():
    """`on_finished` hears of each finished row once, with its final completion, as it finishes (several calls when
    rows stop at different steps); rows set aside by the budget are not reported."""
    model = tiny_model()
    calls = []
    params = SamplingParams(max_new_tokens=10, stop_token_ids=list(range(1, 97, 6)), seed=4)
    engine = RolloutEngine(model, pad_token_id=0, budget=RolloutBudget(max_rows=3))
    out = engine.generate(random_prompts([3, 5, 2]), 3, params, on_finished=lambda rows, ids: calls.append((rows, ids)))
    reported = {row: ids for rows, ids in calls for row, ids in zip(rows, ids)}
    assert sorted(reported) == list(range(9)) and sum(len(rows) for rows, _ in calls) == 9
    assert len(calls) > 1
    assert all(reported[r] == c for r, c in enumerate(out.completions()))
    calls.clear()
    partial = engine.generate(random_prompts([3]), 2, SamplingParams(max_new_tokens=10, seed=4), decode_budget=2,
                              on_finished=lambda rows, ids: calls.append(rows))
    assert partial.finish_reasons == ["partial", "partial"] and calls == []
