"""Sampler/trainer mismatch correction: TRL's importance-sampling math, and HybridGRPOTrainer applying it to the
engine's rollouts (bf16: nonzero mismatch, capped ratios in the loss; fp32: ratios 1 and off by default)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from test_trainer import distinct_words, first_token_parity, grpo_args, prompts_dataset
from trl import GRPOTrainer

import h1rl.rl.trainer as trainer_module
from h1rl.rl.importance import IMPORTANCE_SAMPLING_MODES, importance_sampling_ratio, mismatch_metrics
from h1rl.rl.trainer import HybridGRPOTrainer

# ------------------------------------------------------------------------------------------------ the pure math


def trl_ratio(old, sampling, mask, mode, clip_max, clip_min):
    """TRL 1.16's vLLM branch (`GRPOTrainer._generate_and_score_completions`), transcribed."""
    per_token_logps_diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)


def trl_metrics(per_process, mode):
    """TRL 1.16's `sampling/*` metrics: each process's (old, sampling, ratio, mask), reduced and gathered."""
    stats = []
    for old, sampling, ratio, mask in per_process:
        delta = torch.abs(old - sampling)
        mask = mask.bool()
        delta = delta[mask & ~torch.isnan(delta)]
        flat = ratio.flatten() if mode.startswith("sequence") else ratio[mask]

        def red(t, op):
            return op(t) if t.numel() > 0 else torch.tensor(0.0)

        stats.append([red(delta, torch.mean), red(delta, torch.max), red(flat, torch.min), red(flat, torch.mean),
                      red(flat, torch.max)])
    s = torch.tensor(stats)  # (processes, 5)

    def nan_skip(t, op):
        return op(t[~torch.isnan(t)]).item()

    return {
        "sampling/sampling_logp_difference/mean": s[:, 0].mean().item(),
        "sampling/sampling_logp_difference/max": s[:, 1].max().item(),
        "sampling/importance_sampling_ratio/min": nan_skip(s[:, 2], torch.min),
        "sampling/importance_sampling_ratio/mean": nan_skip(s[:, 3], torch.mean),
        "sampling/importance_sampling_ratio/max": nan_skip(s[:, 4], torch.max),
    }


def random_batch(seed, rows=6, width=9, spread=0.8):
    """Old and sampling log-probs of right-padded completions (one row all padding, one NaN sampling log-prob)."""
    g = torch.Generator().manual_seed(seed)
    old = -4 * torch.rand(rows, width, generator=g)  # (R, L)
    sampling = old + spread * torch.randn(rows, width, generator=g)  # (R, L)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[1] = 0
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (R, L) right padding
    old, sampling = old * mask, sampling * mask  # 0 on padding, as TRL pads them
    sampling[0, 0] = float("nan")  # a token the sampler could not score: TRL counts it as ratio 1
    mask[0, 0] = 1
    return old, sampling, mask


CAPS = [(3.0, None), (1.2, 0.8), (None, 0.9), (1.05, None)]


@pytest.mark.parametrize("mode", IMPORTANCE_SAMPLING_MODES)
@pytest.mark.parametrize("clip_max, clip_min", CAPS)
def test_ratio_matches_trl_formula(mode, clip_max, clip_min):
    old, sampling, mask = random_batch(0)
    ratio = importance_sampling_ratio(old, sampling, mask, mode, clip_max, clip_min)
    expected = trl_ratio(old, sampling, mask, mode, clip_max, clip_min)
    assert ratio.shape == ((6, 9) if mode.startswith("token") else (6, 1))
    torch.testing.assert_close(ratio, expected, rtol=0, atol=0)
    # the behaviour itself, not only agreement with the transcription
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)  # (R, L)
    raw = torch.exp(diff if mode.startswith("token") else diff.sum(-1, keepdim=True))
    low, high = clip_min or 0.0, clip_max or math.inf
    outside = (raw < low) | (raw > high)
    counted = mask.bool() if mode.startswith("token") else torch.ones_like(outside)
    assert (outside & counted).any() and (~outside & counted).any(), "the caps should split this batch"
    if mode.endswith("truncate"):
        torch.testing.assert_close(ratio, raw.clamp(low, high))
    else:
        assert (ratio[outside] == 0).all()
        torch.testing.assert_close(ratio[~outside], raw[~outside])
    if mode.startswith("token"):
        assert ratio[0, 0] == 1.0  # NaN sampling log-prob: no correction
        assert (ratio[mask == 0] == 1.0).all()  # padding: diff 0, ratio 1 (inside every cap tested here)
    else:
        assert ratio[1, 0] == (1.0 if low <= 1.0 <= high else 0.0)  # an all-padding row has a zero sum


def test_bad_settings_are_named():
    old, sampling, mask = random_batch(0)
    with pytest.raises(ValueError, match="'tokens_truncate' is not one of token_truncate"):
        importance_sampling_ratio(old, sampling, mask, "tokens_truncate")
    with pytest.raises(ValueError, match="needs vllm_importance_sampling_clip_max or"):
        importance_sampling_ratio(old, sampling, mask, "token_truncate", clip_max=None, clip_min=None)
    with pytest.raises(ValueError, match=r"\(6, 9\).*\(6, 8\)"):
        importance_sampling_ratio(old, sampling, mask[:, :8], "token_mask")


@pytest.mark.parametrize("mode", IMPORTANCE_SAMPLING_MODES)
def test_metrics_match_trl_gathered_over_two_processes(mode):
    """Two "processes" (one of them with an all-padding batch, which TRL counts as zeros), combined as TRL does."""
    batches = []
    for seed, empty in ((0, False), (1, True)):
        old, sampling, mask = random_batch(seed)
        if empty:
            mask = torch.zeros_like(mask)
        batches.append((old, sampling, importance_sampling_ratio(old, sampling, mask, mode, 1.2, 0.8), mask))
    other = []  # the second process's local values, in the order the first process gathers them
    mismatch_metrics(*batches[1][:2], batches[1][2], batches[1][3], mode, gather=lambda t: other.append(t) or t)
    got = mismatch_metrics(*batches[0][:2], batches[0][2], batches[0][3], mode,
                           gather=lambda t: torch.stack([t, other.pop(0)]))
    assert not other
    expected = trl_metrics(batches, mode)
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    alone = mismatch_metrics(*batches[0][:2], batches[0][2], batches[0][3], mode)  # one process: its own values
    assert alone == pytest.approx(trl_metrics(batches[:1], mode), rel=1e-6)


# --------------------------------------------------------------------------------------------------- the trainer


def sharpened_hybrid(tokenizer, dtype, factor=8.0):
    """A tiny hybrid whose LM head is scaled up, so next-token distributions are peaked (entropy ~3.8 nats instead of
    a random model's ~4.6): near-uniform distributions hide most of the sampler/trainer gap."""
    torch.manual_seed(0)
    model = tiny_model(["t", "m2", "m2"], vocab_size=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model.to(dtype).train()


ORIGINALS = trainer_module.importance_sampling_ratio, GRPOTrainer._compute_loss


class Spy:
    """Records every ratio computed (with its inputs) and what TRL's `_compute_loss` receives (a new spy replaces the
    previous one)."""

    def __init__(self, monkeypatch):
        self.ratios, self.losses = [], []
        compute_ratio, compute_loss = ORIGINALS

        def ratio(old, sampling, mask, mode, clip_max, clip_min):
            out = compute_ratio(old, sampling, mask, mode, clip_max, clip_min)
            self.ratios.append((old.clone(), sampling.clone(), mask.clone(), out.clone()))
            return out

        def loss(trainer, model, inputs):  # the ratio as TRL used it: filled in by the training forward if deferred
            use_vllm = trainer.use_vllm
            out = compute_loss(trainer, model, inputs)
            ratio = inputs.get("importance_sampling_ratio")
            self.losses.append((use_vllm, None if ratio is None else ratio.clone(), inputs["completion_ids"].shape))
            return out

        monkeypatch.setattr(trainer_module, "importance_sampling_ratio", ratio)
        monkeypatch.setattr(GRPOTrainer, "_compute_loss", loss)


@pytest.mark.parametrize("mode, clip_max, clip_min, steps_per_generation", [
    ("token_truncate", 1.01, None, 1),
    ("token_mask", 1.005, 0.995, 2),
    ("sequence_truncate", 1.02, 0.98, 2),
    ("sequence_mask", 1.02, 0.98, 1),
])
def test_bf16_rollouts_are_corrected_with_capped_ratios(tmp_path, monkeypatch, mode, clip_max, clip_min,
                                                        steps_per_generation):
    """A bf16 hybrid: the engine's and the training forward's log-probs differ, the correction is on by default,
    the ratio TRL's loss receives is the capped one (ratios beyond the caps occur and are clamped or zeroed), the
    old log-probs are recomputed (never served), and the mismatch is logged."""
    spy = Spy(monkeypatch)
    tokenizer = tiny_tokenizer()
    model = sharpened_hybrid(tokenizer, torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = grpo_args(tmp_path, max_completion_length=16, steps_per_generation=steps_per_generation,
                     vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=clip_max,
                     vllm_importance_sampling_clip_min=clip_min)
    trainer = HybridGRPOTrainer(model=model, reward_funcs=distinct_words, args=args, train_dataset=prompts_dataset(),
                                processing_class=tokenizer)
    assert trainer.importance_sampling_correction  # auto: bf16 parameters
    trainer.train()
    assert trainer.use_vllm is False
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())

    logs = [e for e in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in e]
    assert len(logs) == 2 // steps_per_generation, trainer.state.log_history  # one per generation batch
    for e in logs:
        assert 0 < e["sampling/sampling_logp_difference/mean"] <= e["sampling/sampling_logp_difference/max"] < 0.5
        if mode.endswith("truncate"):
            assert (clip_min or 0.0) - 1e-6 <= e["sampling/importance_sampling_ratio/min"]
            assert e["sampling/importance_sampling_ratio/max"] <= clip_max + 1e-6
    assert not any("rollout/old_logps_served" in e for e in trainer.state.log_history)

    low, high = clip_min or 0.0, clip_max
    beyond = 0
    for old, sampling, mask, ratio in spy.ratios:
        diff = (old - sampling) * mask  # (R, L)
        raw = torch.exp(diff if mode.startswith("token") else diff.sum(-1, keepdim=True))
        outside = (raw < low) | (raw > high)
        if mode.startswith("token"):
            outside &= mask.bool()
        beyond += int(outside.sum())
        if mode.endswith("truncate"):
            assert ratio.max() <= clip_max and ratio.min() >= low
            torch.testing.assert_close(ratio, raw.clamp(low, high))
        else:
            assert (ratio[outside] == 0).all() and ((ratio == 0) | ((ratio >= low) & (ratio <= high))).all()
    assert beyond > 0, "no ratio went beyond the caps: the test would not see them applied"
    assert spy.losses and all(use_vllm for use_vllm, _, _ in spy.losses)  # TRL applies the ratio under use_vllm
    for _, ratio, shape in spy.losses:
        assert ratio is not None and ratio.shape == (shape[0], shape[1] if mode.startswith("token") else 1)
        assert not torch.isnan(ratio).any()
        assert any(  # rows of a ratio computed above (TRL shuffles the rows and splits them into micro-batches)
            r.shape[1] == ratio.shape[1] and all((r == row).all(-1).any() for row in ratio) for *_, r in spy.ratios
        )


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_batches_trained_before_an_update_take_the_ratio_from_the_training_forward(tmp_path, monkeypatch,
                                                                                   steps_per_generation):
    """Generation and optimizer steps aligned (steps_per_generation 1): the old policy is the trained one, so no
    forward runs besides the training forward (TRL under vLLM runs a no-grad one of the whole batch), and the
    ratio TRL applies is the one computed from that forward's log-probs. Misaligned (2): TRL's own no-grad
    recomputation gives the old log-probs, once per generation."""
    spy = Spy(monkeypatch)
    forwards = []
    original = HybridGRPOTrainer._logps_by_length

    def counted(self, model, *args, **kwargs):
        forwards.append(torch.is_grad_enabled())
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(HybridGRPOTrainer, "_logps_by_length", counted)
    tokenizer = tiny_tokenizer()
    args = grpo_args(tmp_path, max_completion_length=16, steps_per_generation=steps_per_generation,
                     vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.01)
    trainer = HybridGRPOTrainer(model=sharpened_hybrid(tokenizer, torch.bfloat16), reward_funcs=distinct_words,
                                args=args, train_dataset=prompts_dataset(), processing_class=tokenizer)
    trainer.train()
    no_grad = forwards.count(False)
    assert no_grad == (0 if steps_per_generation == 1 else 1), forwards  # 2 steps, 1 or 2 per generation
    assert forwards.count(True) == 2  # the training forwards
    assert len(spy.ratios) == (2 if steps_per_generation == 1 else 1)  # per micro-batch, or per generation
    for (_, ratio, _), (*_, computed) in zip(spy.losses, spy.ratios, strict=steps_per_generation == 1):
        if steps_per_generation == 1:
            assert torch.equal(ratio, computed)
    logs = [e for e in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in e]
    assert logs and all(e["sampling/sampling_logp_difference/mean"] > 0 for e in logs)


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_float32_ratios_are_one_and_the_default_is_off(tmp_path, monkeypatch, steps_per_generation):
    """fp32: turned on explicitly, the recomputed old log-probs equal the engine's within 1e-4 (ratios 1); by default
    the correction is off, TRL's loss gets no ratio, and the engine's log-probs are served as the old ones."""
    tokenizer = tiny_tokenizer()
    results = {}
    for requested in (True, None):
        spy = Spy(monkeypatch)
        model = sharpened_hybrid(tokenizer, torch.float32)
        args = grpo_args(tmp_path / str(requested), max_completion_length=16, steps_per_generation=steps_per_generation,
                         vllm_importance_sampling_mode="token_truncate")
        trainer = HybridGRPOTrainer(model=model, reward_funcs=distinct_words, args=args,
                                    train_dataset=prompts_dataset(), processing_class=tokenizer,
                                    importance_sampling_correction=requested)
        assert trainer.importance_sampling_correction is (requested is True)
        trainer.train()
        results[requested] = spy, trainer.state.log_history
    spy, logs = results[True]
    metrics = [e for e in logs if "sampling/importance_sampling_ratio/min" in e]
    assert len(metrics) == 2 // steps_per_generation
    for e in metrics:
        assert e["sampling/sampling_logp_difference/max"] < 1e-4
        assert 1 - 1e-4 < e["sampling/importance_sampling_ratio/min"] <= e["sampling/importance_sampling_ratio/max"]
        assert e["sampling/importance_sampling_ratio/max"] < 1 + 1e-4
    for *_, ratio in spy.ratios:
        assert (ratio - 1).abs().max() < 1e-4
    assert all(use_vllm and ratio is not None for use_vllm, ratio, _ in spy.losses)
    assert not any("rollout/old_logps_served" in e for e in logs)

    spy, logs = results[None]
    assert not spy.ratios and not any(k.startswith("sampling/") for e in logs for k in e)
    assert spy.losses and all(not use_vllm and ratio is None for use_vllm, ratio, _ in spy.losses)
    served = [e.get("rollout/old_logps_served", 0.0) for e in logs if "loss" in e]
    assert served == ([1.0, 0.0] if steps_per_generation == 2 else [0.0, 0.0]), served


@pytest.mark.parametrize("dtype, bf16, requested, expected", [
    (torch.float32, False, None, False),
    (torch.bfloat16, False, None, True),
    (torch.float32, True, None, True),  # fp32 weights under bf16 mixed precision (autocast): not float32
    (torch.bfloat16, False, False, False),
    (torch.float32, False, True, True),
])
def test_auto_switch(tmp_path, dtype, bf16, requested, expected):
    tokenizer = tiny_tokenizer()
    trainer = HybridGRPOTrainer(model=sharpened_hybrid(tokenizer, dtype), reward_funcs=distinct_words,
                                args=grpo_args(tmp_path, bf16=bf16), train_dataset=prompts_dataset(),
                                processing_class=tokenizer, importance_sampling_correction=requested)
    assert trainer.importance_sampling_correction is expected


def test_contradicting_settings_are_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    model = sharpened_hybrid(tokenizer, torch.float32)
    common = dict(model=model, reward_funcs=distinct_words, train_dataset=prompts_dataset(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="contradicts GRPOConfig's vllm_importance_sampling_correction=False"):
        HybridGRPOTrainer(args=grpo_args(tmp_path, vllm_importance_sampling_correction=False),
                          importance_sampling_correction=True, **common)
    off = HybridGRPOTrainer(args=grpo_args(tmp_path, vllm_importance_sampling_correction=False),
                            **{**common, "model": sharpened_hybrid(tokenizer, torch.bfloat16)})
    assert off.importance_sampling_correction is False  # TRL's own switch turns the auto default off
    with pytest.raises(ValueError, match="'vespo' .* needs a token-level"):
        HybridGRPOTrainer(args=grpo_args(tmp_path, loss_type="vespo"), importance_sampling_correction=True, **common)


def one_batch(tmp_path, loss_type="dapo", skip=True):
    """A trainer (fp32, correction off) and one scored batch of 2 prompts x 4 rows, ready for `_compute_loss`."""
    tokenizer = tiny_tokenizer()
    model = sharpened_hybrid(tokenizer, torch.float32)
    args = grpo_args(tmp_path, per_device_train_batch_size=8, max_completion_length=12, loss_type=loss_type,
                     gradient_checkpointing=False)
    dataset = prompts_dataset()
    trainer = HybridGRPOTrainer(model=model, reward_funcs=distinct_words, args=args, train_dataset=dataset,
                                processing_class=tokenizer, skip_zero_advantage_rows=skip)
    trainer.current_gradient_accumulation_steps = 1  # set by transformers' training loop
    inputs = trainer._generate_and_score_completions([dataset[i] for i in range(2) for _ in range(4)])
    assert (inputs["advantages"] != 0).all()
    return trainer, model, inputs


def loss_and_grads(trainer, model, inputs):
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_the_ratio_scales_each_token_loss(tmp_path, loss_type):
    """Known ratios: 2 everywhere doubles the loss and its gradient; a per-row ratio of 0 on some rows equals
    training without those rows' advantages (TRL multiplies the per-token loss by the ratio)."""
    trainer, model, inputs = one_batch(tmp_path, loss_type)
    R, L = inputs["completion_ids"].shape
    plain, plain_grads = loss_and_grads(trainer, model, inputs)
    assert max(g.abs().max() for g in plain_grads.values()) > 1e-3
    twice = torch.full((R, L), 2.0)  # (R, L), a token-level ratio
    doubled, doubled_grads = loss_and_grads(trainer, model, {**inputs, "importance_sampling_ratio": twice})
    torch.testing.assert_close(doubled, 2 * plain)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(doubled_grads[name], 2 * grad, msg=name)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])[:, None]  # (R, 1), a sequence-level ratio
    weighted, weighted_grads = loss_and_grads(trainer, model, {**inputs, "importance_sampling_ratio": keep})
    dropped, dropped_grads = loss_and_grads(trainer, model, {**inputs, "advantages": inputs["advantages"] * keep[:, 0]})
    assert any(not torch.allclose(weighted_grads[n], g) for n, g in plain_grads.items())  # the ratio mattered
    torch.testing.assert_close(weighted, dropped)
    for name, grad in dropped_grads.items():
        torch.testing.assert_close(weighted_grads[name], grad, msg=name)
    assert trainer.use_vllm is False


def test_skipped_rows_take_their_ratio_with_them(tmp_path):
    """skip_zero_advantage_rows drops rows inside `_compute_loss`: their ratios go with them (same loss and gradient
    as training on every row with the same per-token ratio)."""
    results = {}
    for skip in (False, True):
        trainer, model, inputs = one_batch(tmp_path / str(skip), skip=skip)
        R, L = inputs["completion_ids"].shape
        ratio = torch.linspace(0.5, 1.5, R * L).reshape(R, L)  # every token its own ratio
        advantages = inputs["advantages"] * torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 0])
        results[skip] = loss_and_grads(trainer, model, {**inputs, "advantages": advantages,
                                                        "importance_sampling_ratio": ratio})
        if skip:
            assert trainer._metrics["train"]["train/rows_trained"] == [0.5]
        results[f"{skip} without"] = loss_and_grads(trainer, model, {**inputs, "advantages": advantages})
    (full, full_grads), (kept, kept_grads) = results[False], results[True]
    assert not torch.allclose(full, results["False without"][0])  # the ratio matters to this loss
    torch.testing.assert_close(kept, full)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_dynamic_sampling_keeps_ratios_aligned_with_rows(tmp_path, monkeypatch, steps_per_generation):
    """Refilled batches (rows merged from several rounds, re-padded): the old log-probs (recomputed once on the final
    batch, or TRL's per round and merged) still line up with the engine's row by row: in fp32 they agree to 1e-4,
    where a row or column out of place would differ by nats."""
    spy = Spy(monkeypatch)
    tokenizer = tiny_tokenizer()
    model = sharpened_hybrid(tokenizer, torch.float32)
    args = grpo_args(tmp_path, max_steps=3, num_generations=2, max_completion_length=12,
                     steps_per_generation=steps_per_generation)
    trainer = HybridGRPOTrainer(model=model, reward_funcs=first_token_parity, args=args,
                                train_dataset=prompts_dataset(16), processing_class=tokenizer,
                                dynamic_sampling_rounds=3, importance_sampling_correction=True)
    assert trainer.vllm_importance_sampling_mode == "sequence_mask"  # TRL's default: one ratio per row
    trainer.train()
    logs = trainer.state.log_history
    assert sum(e.get("dynamic_sampling/tied_groups", 0) for e in logs) > 0  # refills happened
    assert len(spy.ratios) == (3 if steps_per_generation == 1 else 2)  # once per generation batch, after refills
    for old, sampling, mask, ratio in spy.ratios:
        assert ((old - sampling) * mask).abs().max() < 1e-4
        assert ((mask == 0) == (sampling == 0)).all()  # completions and sampling log-probs padded alike
        assert ratio.shape == (old.shape[0], 1)


@pytest.mark.slow
def test_two_processes_under_zero3_match_one(tmp_path):
    """The correction on (float32, explicitly) with 2 processes under ZeRO-3 (tests/zero's harness and world: the
    processes' completions differ in length): both run equally many forwards for the recomputed old log-probs, the
    metrics are gathered, and the run equals one process with the same global batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "zero"))
    from test_zero import check_ranks, grpo_world, launch, single

    recipe, model = grpo_world(tmp_path)
    settings = ["--importance_sampling_correction", "true", "--vllm_importance_sampling_mode", "token_truncate"]
    single("grpo", recipe, "--output_dir", str(tmp_path / "single"), *settings)
    reference = load_file(tmp_path / "single" / "final" / "model.safetensors")
    ranks = launch("grpo", recipe, tmp_path / "report", "--output_dir", str(tmp_path / "zero3"), "--deepspeed", "zero3",
                   "--per_device_train_batch_size", "4", *settings)
    check_ranks(ranks, reference, load_file(model / "model.safetensors"))
    for info in ranks:
        logs = [e for e in info["log_history"] if "sampling/importance_sampling_ratio/max" in e]
        assert len(logs) == 3, info["log_history"]
        for e in logs:
            assert 0 < e["sampling/sampling_logp_difference/max"] < 1e-4
            assert abs(e["sampling/importance_sampling_ratio/min"] - 1) < 1e-4
