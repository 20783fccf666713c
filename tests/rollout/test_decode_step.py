"""StaticDecoder (static-shape decode, CUDA graphs per bucket) == the dynamic decode; the engine modes agree."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model

from h1rl.rollout import RolloutEngine, SamplingParams
from h1rl.rollout.decode_step import StaticDecoder, batch_buckets

LAYOUTS = {
    "mixed": ["t", "m2", "i", "m2"],
    "attention_first": ["t", "t", "m2"],
    "with_identity": ["i", "m2", "t", "i"],
    "no_mamba": ["t", "t"],
    "no_attention": ["m2", "i"],
}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=list(LAYOUTS))
def model(request):
    torch.manual_seed(0)
    return tiny_model(LAYOUTS[request.param])


def decode_both_ways(model, lengths, steps, extra=3, rows_per_step=None):
    """Prefill a left-padded batch, then teacher-force `steps` random tokens through the model's own one-token decode
    (forward with a cache, as `generate` runs it) and through a StaticDecoder holding a copy of the same state, all
    rows writing the same column. Returns the max abs difference of the logits over all steps. `rows_per_step[t]`:
    decode only the first n rows at step t (the engine's compacted batch); rows keep their buffer slots."""
    ids, mask = left_padded_batch(lengths)
    B, Tp = ids.shape
    Smax = Tp + steps + extra  # spare columns the static step must ignore
    with torch.no_grad():
        dynamic = model.allocate_cache(B, Smax)  # big enough: the model never reallocates it under a narrowed view
        model(ids, attention_mask=mask, cache=dynamic, use_cache=True)
        decoder = StaticDecoder(model, B, Smax)
        decoder.cache.copy_rows_(torch.arange(B), dynamic, torch.arange(B), Tp)
    decoder.key_valid[:, :Tp] = mask.bool()
    full_mask = torch.cat([mask, torch.ones(B, Smax - Tp, dtype=torch.long)], dim=1)
    positions = mask.sum(1)  # (B,) next RoPE position of each row
    worst = 0.0
    for t in range(steps):
        n = B if rows_per_step is None else rows_per_step[t]
        tokens = torch.randint(1, model.config.vocab_size, (n,))
        with torch.no_grad():
            ref = model(
                tokens[:, None],
                attention_mask=full_mask[:n, : Tp + t + 1],
                position_ids=positions[:n, None],
                cache=dynamic.narrow(n),
                use_cache=True,
            ).logits[:, -1]
        dynamic.set_length(Tp + t + 1)  # the narrowed view counted for itself
        got = decoder.step(tokens, positions[:n], torch.full((n,), Tp + t), num_keys=Tp + t + 1)
        assert got.shape == ref.shape
        worst = max(worst, (got - ref).abs().max().item())
        positions = positions + 1
    return worst


def test_rows_of_different_lengths_equal_a_full_forward(model):
    """Each row at its own column (the engine's left-aligned slots): teacher-forced step-by-step logits equal one
    full forward over each row's sequence (mamba-ssm's generation test, per row)."""
    lengths, steps = [5, 2, 7, 3], 6
    B, Smax = len(lengths), max(lengths) + steps
    seqs = [torch.randint(1, 97, (n + steps,)) for n in lengths]
    decoder = StaticDecoder(model, B, Smax)
    with torch.no_grad():
        for i, seq in enumerate(seqs):  # each prompt prefilled alone, then copied into its slot
            cache = model.allocate_cache(1, lengths[i])
            model(seq[None, : lengths[i]], cache=cache, use_cache=True)
            decoder.cache.copy_rows_(torch.tensor([i]), cache, torch.tensor([0]), lengths[i])
        full = [model(seq[None]).logits[0] for seq in seqs]  # (n + steps, V) each
    columns = torch.tensor(lengths)
    for t in range(steps):
        tokens = torch.stack([seq[lengths[i] + t] for i, seq in enumerate(seqs)])
        got = decoder.step(tokens, columns, columns, num_keys=int(columns.max()) + 1)
        for i in range(B):
            assert (got[i] - full[i][lengths[i] + t]).abs().max() <= 1e-5, f"row {i} step {t}"
        columns = columns + 1


def test_static_step_equals_dynamic_decode_with_left_padding(model):
    assert decode_both_ways(model, [5, 2, 7, 1], steps=6) <= 1e-5


def test_static_step_equals_dynamic_decode_on_a_shrinking_batch(model):
    # rows beyond n are left untouched by both paths (as after the engine's compaction)
    assert decode_both_ways(model, [4, 6, 3, 6], steps=5, rows_per_step=[4, 4, 3, 2, 2]) <= 1e-5


def test_static_step_with_sliding_window_qk_norm_and_bias():
    torch.manual_seed(1)
    model = tiny_model(["t", "m2", "t"], attention_qkv_bias=True, attention_qk_norm=True, sliding_window=4)
    assert decode_both_ways(model, [6, 3, 8], steps=7) <= 1e-5


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1500, start=256) == [256, 512, 1024, 1500]
    decoder = StaticDecoder(tiny_model(), batch_size=12, max_len=8)
    assert [decoder.bucket(n) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    assert decoder.key_buckets == [8]
    with pytest.raises(ValueError, match="1..12 rows, got 13"):
        decoder.bucket(13)


def test_bad_static_decoder_inputs_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="cannot use CUDA graphs: the model is on cpu"):
        StaticDecoder(model, 2, 8, use_cuda_graphs=True)
    decoder = StaticDecoder(model, 2, 8)
    one, zero = torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"num_keys 9 is outside the KV buffer \[1, 8\]"):
        decoder.step(one, zero, zero, num_keys=9)
    with pytest.raises(ValueError, match="decode must be one of"):
        RolloutEngine(model, pad_token_id=0, decode="graphs")
    with pytest.raises(ValueError, match="decode='cuda_graph' is not possible: the model is on cpu"):
        RolloutEngine(model, pad_token_id=0, decode="cuda_graph").generate([[1, 2]])
    assert RolloutEngine(model, pad_token_id=0).decode_mode() == "eager"  # "auto" on CPU


def random_prompts(lengths: list[int], vocab: int = 97) -> list[list[int]]:
    return [torch.randint(1, vocab, (n,)).tolist() for n in lengths]


def assert_same_rollouts(a, b, logprob_tol=1e-5):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.lengths, b.lengths) and a.finish_reasons == b.finish_reasons
    assert (a.logprobs - b.logprobs).abs().max() <= logprob_tol
    assert a.stats["state_bytes_per_seq"] == b.stats["state_bytes_per_seq"]


@pytest.mark.parametrize("compact_fraction", [0.0, 2.0])  # compact at every step / never
def test_engine_static_decode_equals_eager(model, compact_fraction):
    prompts = random_prompts([3, 7, 1])
    stops = list(range(1, 97, 4))
    for params in (
        SamplingParams(max_new_tokens=12, temperature=0),
        SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, stop_token_ids=stops, seed=5),
    ):
        runs = {
            mode: RolloutEngine(model, 0, compact_fraction=compact_fraction, decode=mode).generate(prompts, 3, params)
            for mode in ("eager", "static")
        }
        assert_same_rollouts(runs["eager"], runs["static"])
        assert runs["static"].stats["graph_capture_s"] == 0.0


@cuda_only
@pytest.mark.parametrize("compact_fraction", [0.0, 2.0])
def test_engine_cuda_graph_decode_equals_eager(compact_fraction):
    torch.manual_seed(0)
    model = tiny_model(["t", "m2", "i", "m2", "t"]).cuda()
    prompts = random_prompts([3, 7, 1, 5, 2])
    params = SamplingParams(max_new_tokens=20, temperature=1.0, stop_token_ids=list(range(1, 97, 5)), seed=3)
    runs = {
        mode: RolloutEngine(model, 0, compact_fraction=compact_fraction, decode=mode).generate(prompts, 3, params)
        for mode in ("eager", "static", "cuda_graph")
    }
    assert_same_rollouts(runs["eager"], runs["cuda_graph"], logprob_tol=1e-4)
    assert_same_rollouts(runs["static"], runs["cuda_graph"], logprob_tol=1e-5)
    assert runs["cuda_graph"].stats["graph_capture_s"] > 0


class EagerGraph:
    """Stands in for a (batch, key) bucket's CUDA graph on CPU: a replay runs the static step over all `bucket` rows
    (padding rows included) and `keys` columns into the decoder's one logits buffer, as the captured graph would."""

    def __init__(self, decoder: StaticDecoder, bucket: int, keys: int):
        self.decoder, self.bucket, self.keys = decoder, bucket, keys
        self.replays_with_padding = 0

    def replay(self):
        n_active = int(self.decoder._active)
        self.replays_with_padding += int(n_active < self.bucket)
        self.decoder._logits[: self.bucket].copy_(self.decoder.forward(self.bucket, self.keys))


def test_engine_bucketed_replay_with_padding_rows_equals_eager(monkeypatch):
    """The graph path's bookkeeping (batch and key buckets, padding rows, compaction inside the same buffers), run
    on CPU."""
    import h1rl.rollout.decode_step as decode_step
    import h1rl.rollout.engine as engine_module

    graphs = []

    def capture(self, b, k):
        if self._logits is None:
            self._logits = torch.empty(self.batch_size, self.model.config.vocab_size)
        graphs.append(EagerGraph(self, b, k))
        self._graphs[b, k] = graphs[-1]

    original_step = StaticDecoder.step

    def step(self, tokens, positions, columns, num_keys=None):
        self._active = tokens.shape[0]
        return original_step(self, tokens, positions, columns, num_keys)

    monkeypatch.setattr(decode_step, "graphs_unsupported_reason", lambda model: None)
    monkeypatch.setattr(engine_module, "graphs_unsupported_reason", lambda model: None)
    monkeypatch.setattr(decode_step, "MIN_KEY_BUCKET", 4)  # several key buckets at this size
    monkeypatch.setattr(StaticDecoder, "_capture", capture)
    monkeypatch.setattr(StaticDecoder, "step", step)
    torch.manual_seed(0)
    model = tiny_model(["t", "m2", "i", "m2", "t"])
    prompts = random_prompts([3, 7, 1, 5, 2])
    params = SamplingParams(max_new_tokens=16, temperature=1.0, stop_token_ids=list(range(1, 97, 4)), seed=3)
    eager = RolloutEngine(model, 0, compact_fraction=0.0, decode="eager").generate(prompts, 3, params)
    graphed = RolloutEngine(model, 0, compact_fraction=0.0, decode="cuda_graph").generate(prompts, 3, params)
    assert_same_rollouts(eager, graphed)
    assert len({g.bucket for g in graphs}) > 1 and len({g.keys for g in graphs}) > 1  # several buckets of each
    assert sum(g.replays_with_padding for g in graphs) > 0
