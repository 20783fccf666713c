"""`h1rl bench memory --measure` on a small hybrid: what it counts, how it scales, that it leaves nothing patched."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers.masking_utils as masking_utils
from torch._subclasses.fake_tensor import FakeTensorMode
from trl.kernels import chunked_logprob

import h1rl.models.attention as attention
import h1rl.models.mamba as mamba
import h1rl.models.scan as scan
from h1rl.bench.attention_calls import fused_kernels
from h1rl.bench.memory import (
    LiveBytes,
    MathKernelError,
    Measured,
    ModelSizes,
    Settings,
    Shape,
    build_models,
    fewest_gpus,
    fused_kernels_counted,
    measure,
    measure_distill,
    measure_rollout,
    measure_training,
    phase_rows,
)
from h1rl.rollout.engine import RolloutBudget

# Dimensions a multiple of 512 bytes wherever a tensor's size is checked exactly (the tracker rounds to 512).
SHAPE = Shape(hidden=128, layers=4, m2_layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=512,
              d_state=16, d_inner=128, d_xb=64)


@pytest.fixture(scope="module")
def fake():
    """A fake-tensor mode and the student and teacher of SHAPE built on it (re-entered by each test)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with warnings.catch_warnings(), mode:
        warnings.simplefilter("ignore")
        student, teacher = build_models(SHAPE)
    return mode, student, teacher


@contextlib.contextmanager
def measuring(mode: FakeTensorMode):
    with warnings.catch_warnings(), mode, fused_kernels_counted() as calls:
        warnings.simplefilter("ignore")
        yield calls


def patched_names():
    return {
        "h1rl sdpa": attention.scaled_dot_product_attention,
        "torch sdpa": F.scaled_dot_product_attention,
        "causal_lower_right": attention.causal_lower_right,
        "mamba-ssm scan": scan._mamba_scan_fn,
        "is_cuda seam": scan._is_cuda,
        "mamba.selective_scan": mamba.selective_scan,
        "trl forward fold": chunked_logprob._forward_tile,
        "trl backward fold": chunked_logprob._backward_tile,
        "trl addmm": chunked_logprob._addmm_fp32,
        "packed sequences": masking_utils.find_packed_sequence_indices,
    }


def test_live_bytes_counts_new_storages_once_and_frees_them():
    with FakeTensorMode():
        weight = torch.empty(256, 256)  # made before the block: not counted, nor its views
        with LiveBytes() as live:
            a = torch.empty(1024, 1024)  # 4 MiB
            view = a.t()
            weight_view = weight.t()
            assert live.current == 4 * 2**20
            b = a * 2
            assert live.current == live.peak == 8 * 2**20
            del a, b
            assert live.current == 4 * 2**20  # the view keeps a's storage alive
            del view, weight_view
            assert live.current == 0 and live.peak == 8 * 2**20


def test_stand_ins_are_restored_even_after_an_error():
    before = patched_names()
    with pytest.raises(RuntimeError, match="inside"), fused_kernels_counted():
        assert attention.scaled_dot_product_attention is not before["h1rl sdpa"]
        assert scan._mamba_scan_fn is not before["mamba-ssm scan"]
        raise RuntimeError("inside")
    assert patched_names() == before
    assert attention.scaled_dot_product_attention is F.scaled_dot_product_attention  # the real kernel, both names
    assert mamba.selective_scan is scan.selective_scan


def test_a_call_no_fused_kernel_takes_fails_loudly():
    with FakeTensorMode(), fused_kernels_counted():
        q = torch.empty(1, 4, 8, 32, dtype=torch.bfloat16)
        mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)  # flash takes no mask, memory-efficient not this dtype
        with pytest.raises(MathKernelError, match="no fused kernel"):
            attention.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_training_peak_is_linear_in_length_and_checkpointed(fake):
    mode, student, _ = fake
    peaks = {}
    with measuring(mode) as calls:
        for T in (512, 1024, 1536):
            peaks[T] = measure_training(student, T, prompt_len=128, micro_batch=2, calls=calls)
        assert all(fused_kernels(c) for c in calls) and len(calls) == 3 * 2 * 2  # 2 layers, forward + recompute
        student.activation_checkpointing_disable()
        try:
            unchecked = measure_training(student, 1536, prompt_len=128, micro_batch=2, calls=calls)
        finally:
            student.activation_checkpointing_enable()
    step1, step2 = peaks[1024].peak - peaks[512].peak, peaks[1536].peak - peaks[1024].peak
    assert step1 > 0 and abs(step2 - step1) <= 0.01 * step1
    # checkpointing keeps at least each layer's (B, T, D) input; without it, each layer also keeps (at least) its
    # MLP's gate and up projections (B, T, intermediate)
    assert peaks[1536].peak >= SHAPE.layers * 2 * 1536 * SHAPE.hidden * 2
    assert unchecked.peak - peaks[1536].peak >= SHAPE.layers * 2 * (2 * 1536 * SHAPE.intermediate * 2)
    assert peaks[1536].attention_calls == {"flash": 4}  # bf16 grouped heads, no mask
    assert peaks[1536].analytic == 2 * 2 * 1536 * SHAPE.hidden * 2  # the left-padded batch's two gathers


def test_rollout_cache_is_slots_times_one_rows_state(fake):
    mode, student, _ = fake
    S, Tp, slots = 1024, 256, 6
    per_row = (SHAPE.layers - SHAPE.m2_layers) * 2 * SHAPE.kv_heads * S * SHAPE.head_dim * 2 \
        + SHAPE.m2_layers * (SHAPE.d_inner * 4 * 2 + SHAPE.d_inner * SHAPE.d_state * 4)  # KV bf16; conv bf16, SSM fp32
    with measuring(mode) as calls:
        rollout = measure_rollout(student, S, Tp, generations=4, rows=16,
                                  budget=RolloutBudget(max_rows=slots, prefill_chunk=96), calls=calls)
        assert all(fused_kernels(c) for c in calls)
    assert rollout.extra["slots"] == slots  # the engine's plan_rows under max_rows
    assert rollout.extra["decode_cache"] == slots * per_row
    assert rollout.extra["prompts_prefilled_at_once"] == 2  # 6 slots hold rows of 2 groups of 4
    assert rollout.cache >= rollout.extra["decode_cache"] + rollout.extra["prefill_cache"]
    assert rollout.peak > rollout.cache  # prefill activations, logits, sampling on top
    # prefill: ceil(256 / 96) = 3 chunks per attention layer (the later two continue the cache); one decode step
    assert rollout.attention_calls == {"flash": 6, "efficient": 2}


def test_distillation_runs_the_teacher_on_flash_and_counts_only_the_student_graph(fake):
    mode, student, teacher = fake
    with measuring(mode) as calls:
        distill = measure_distill(student, teacher, batch_size=2, seq_len=512, calls=calls)
        # student: 2 attention layers, forward + recompute; teacher: 4 layers, no mask (one sequence per row)
        assert distill.attention_calls == {"flash": 2 * 2 + 4}
        assert all(c.attn_mask is None for c in calls)
        assert all(p.grad is None for p in student.parameters())  # gradients dropped once accumulated (ZeRO-3)
    assert distill.peak >= SHAPE.layers * 2 * 512 * SHAPE.hidden * 2


def test_zero3_rows_and_fewest_gpus():
    sizes = ModelSizes(student=10**9, teacher=10**9, lm_head=10**8, largest_layer=10**7)
    rows = {item: b for item, _, b in phase_rows("rollout", sizes, 8, Measured(peak=5, cache=3))}
    assert rows["parameters (bf16, 1/N)"] == rows["gradients (bf16, 1/N)"] == 2 * 10**9 // 8
    assert rows["optimizer states (fp32 master + Adam, 1/N)"] == 12 * 10**9 // 8
    assert rows["gathered weights"] == 2 * 10**9  # the whole model for generation
    assert rows["KV / state cache"] == 3 and rows["activations / temporaries"] == 2
    assert rows["total per GPU"] == 16 * 10**9 // 8 + 2 * 10**9 + 5
    not_gathered = {item: b for item, _, b in phase_rows("rollout", sizes, 8, Measured(5), False)}
    assert not_gathered["gathered weights"] == 2 * (10**8 + 10**7)
    assert fewest_gpus(lambda n: 16 * 10**9 / n < 10**9) == 24
    assert fewest_gpus(lambda n: False) is None


def test_measure_end_to_end_on_a_small_shape():
    result = measure(SHAPE, Settings(seq_lens=[512], prompt_len=128, generations=4, rollout_rows=8,
                                     distill_batch=2, distill_seq_len=256, gpus=8), progress=lambda _: None)
    entry = result["per_seq_len"][512]
    assert entry["gpus"] == 8
    for phase, rows in entry["rows"].items():
        assert rows[-1][2] == sum(nbytes for _, _, nbytes in rows[:-1])  # the total per GPU
        items = {item: nbytes for item, _, nbytes in rows}
        assert items["KV / state cache"] == entry["measured"][phase]["cache"]
    assert entry["measured"]["rollout"]["extra"]["slots"] == 8  # everything fits: all rows at once
    assert entry["budget"]["max_rows"] == 8
    assert result["plans"]["80 GB"]["per_seq_len"][512]["fewest_gpus"]["every phase"] == 8
    assert result["seconds"] > 0


def test_cli_delegates_bench_memory(capsys):
    from h1rl.cli import main

    assert main(["bench", "memory", "--gpus", "8"]) == 0  # without --measure: the arithmetic table
    assert "| ZeRO-3: all sharded | 16P / 8 |" in capsys.readouterr().out
