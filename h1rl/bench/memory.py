"""`h1rl bench memory`: per-GPU peak memory of GRPO and distillation at the Apriel-H1-15B shape under ZeRO-3.

    h1rl bench memory --measure [--seq-lens 8192 32768] [--gpus N] [--json memory.json]  # measured: ~1.5 min, 2 CPUs
    h1rl bench memory [--gpus 16] [--seq-len 8192]                                         # the arithmetic table

`--measure` runs the real code paths on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`, CPU fake
tensors: shapes, dtypes and storages are real, nothing is allocated or computed) and counts the bytes of every
tensor storage made inside a phase and still alive after each operation (`LiveBytes`, a `TorchDispatchMode`; not
torch's `MemTracker`, which cannot count a frozen teacher and wants one root module for an LM head called per chunk).
A storage is counted once however many views share it and subtracted when its last reference dies; sizes are rounded
up to 512 bytes as CUDA's caching allocator does; the weights, made before, are not counted. Phases, each for rows
of T tokens in all (`--prompt-len` prompt tokens, then T - prompt completion tokens):

1. GRPO training micro-batch: `HybridForCausalLM` with transformers' activation checkpointing
   (`activation_checkpointing_enable`, non-reentrant, what `gradient_checkpointing_enable` calls) and TRL's fused
   LM head (`add_fused_lm_head(model, outputs=("log_probs", "entropy"))` as `GRPOTrainer.__init__` adds it, called
   `model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)` as `_get_per_token_logps_and_entropies`
   calls it), a clipped-ratio GRPO loss on the completion's log-probs, backward. Each parameter's gradient is dropped
   once accumulated, as ZeRO-3 reduce-scatters it into its shard.
2. A rollout phase of `h1rl.rollout.RolloutEngine` under its `RolloutBudget`: the slots `plan_rows` gives, the decode
   cache (`StaticDecoder`), the engine's bookkeeping, the prefill of the distinct prompts of one admission
   (`RolloutEngine._prefill`, `prefill_chunk` tokens per call, each chunk continuing the cache), the copy of a
   prompt's state into its slots, one decode step over the full KV buffer (`StaticDecoder.forward(slots, S)`) and
   `sample_next` on its (slots, V) logits. The prefill cache stays referenced during decoding, as in `_rollout`.
   The engine's loop itself reads tensors on the host, so its parts run one by one. Bytes against slots are fitted
   on one and two whole groups of G rows; the tables measure again at the slots that fit.
3. Distillation step: `h1rl.distill.trainer.batch_loss` of the student (checkpointed) against the all-attention
   teacher (transformers' `MistralForCausalLM`, frozen, no grad), with the chunked KD loss of `h1rl.distill.losses`
   sized by `LossConfig.chunk_bytes`, and backward.

Counted analytically (stood in during the measurement, `fused_kernels_counted`), because fake tensors cannot run them:
- attention: fake mode decomposes `scaled_dot_product_attention` into the math kernel (it would materialise the
  (T, S) scores: 33 GiB for 2 x 32 heads x 8k). Each call (h1rl's, patched at `h1rl.models.attention`, and the
  teacher's, at `torch.nn.functional`) is checked with `h1rl.bench.attention_calls.fused_kernels` and replaced by what
  PyTorch's fused kernels allocate: flash / memory-efficient forward returns the output (in their (B, T, H, P)
  layout) and a float32 log-sum-exp (B, H, T) and saves q, k, v, out and it; flash-attn 2's backward allocates dq,
  dk, dv, softmax_d (B, H, T) and a float32 dq accumulator (B, H, T, P), and for grouped heads full-head dk, dv
  (B, S, H, P) that it then sums; a boolean mask (memory-efficient) becomes an additive bias in the query's dtype.
  A call that fits neither fused kernel fails the bench.
- the selective scan: on CPU h1rl runs a C kernel through ctypes (no fake tensors) or a Python loop over time
  steps (one op per step, too slow at 32k). The bench dispatches `h1rl.models.scan.selective_scan` to its CUDA path
  (`_cuda_scan`, h1rl's own glue: layouts, casts, the prepended steps of a continued state) with mamba-ssm's
  `selective_scan_fn` stood in by what it allocates: contiguous copies of u, delta, B, C when their last stride is
  not 1, y, and its float32 state checkpoints (b, d_inner, ceil(T / 2048), 2 d_state), all saved for backward;
  backward allocates du, ddelta, and float32 dA, dB, dC.
- TRL's fused LM head: its Triton folds (`_forward_kernel`, `_backward_kernel`) and the float32-output GEMM of
  `_addmm_fp32` allocate nothing on CUDA; their CPU fallbacks make (4096, 32768) float32 temporaries. The bench
  counts the CUDA path (the fallbacks are stood in by no-ops); it scores every position (the CPU layout) where CUDA
  scores completion positions only, which overcounts its (N, D) buffers by prompt / T.
Not stood in: causal-conv1d (the torch convolution path is counted; the CUDA kernel needs one (B, d_inner, T) copy
less) and mamba-ssm's decode-step kernel (the torch step makes (rows, d_inner, d_state) float32 temporaries).

What cannot be measured on fake tensors: the model reads the attention mask on the host (`MaskLayout.of`), so rows
run unpadded (`attention_mask=None`, equal lengths). TRL's left-padded training batch runs left-aligned with no mask
(`h1rl.models.batch.left_align`): the unpadded forward plus two (B, T, D) gathers, added analytically. Two fake-mode
artefacts are undone during the measurement: transformers takes fake tensors for a trace and then assumes packed rows
(`find_packed_sequence_indices`: a (B, 1, T, T) mask for the teacher; on real tensors it finds one sequence per row),
and `causal_lower_right` (a tensor subclass without data) is made outside the fake mode. Recorded attention calls
keep meta copies of their tensors, so recording holds no memory.

ZeRO-3 is accounted for here, not run: per GPU 1/N of the bf16 weights (2 bytes per parameter), bf16 gradients (2)
and fp32 master weights + Adam moments (12); gathered weights: during training the LM head (inside TRL's fused head)
and one decoder layer (DeepSpeed's prefetch), during a rollout with `ds3_gather_for_generation` the whole model
(2P), without it the same as in training; during distillation both LM heads (each loss chunk calls both); the
teacher's bf16 weights 1/N. GPU sizes are the totals nvidia-smi reports (80 GB: 81559 MiB, 141 GB: 143771 MiB) less
`--reserve-gib` for the CUDA context, NCCL buffers and allocator fragmentation.

Without `--measure`: the arithmetic table of earlier versions (`estimate`), kept for quick what-ifs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from h1rl.bench.attention_calls import AttentionCall, fused_kernels, record_attention_calls

GiB = 2**30
MiB = 2**20
GPU_SIZES = {"80 GB": 81559 * MiB, "141 GB": 143771 * MiB}  # totals as nvidia-smi reports them (H100, H200)


@dataclass
class Shape:
    """A hybrid's size: the 15B Apriel-Nemotron teacher's shape by default (../shared/DESIGN.md)."""

    hidden: int = 5120
    layers: int = 50
    m2_layers: int = 30  # Apriel-H1-15b-Thinker: 30 of 50 layers are m2 ("H-30")
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 131072
    d_state: int = 16
    d_inner: int = 4096
    d_xb: int = 1024
    d_conv: int = 4
    dt_rank: int | None = None  # None: ceil(hidden / 16) = 320 at hidden 5120
    layout: list[str] | None = None  # one code per layer; None: m2_layers "m2" layers, then "t" layers

    def block_layout(self) -> list[str]:
        layout = self.layout or ["m2"] * self.m2_layers + ["t"] * (self.layers - self.m2_layers)
        if len(layout) != self.layers:
            raise ValueError(f"the layout has {len(layout)} codes for {self.layers} layers")
        return list(layout)


def hybrid_config(shape: Shape):
    """The `HybridConfig` of `shape` (untied embeddings, no sliding window)."""
    from h1rl.models import HybridConfig

    ssm_cfg = {"d_state": shape.d_state, "d_inner": shape.d_inner, "d_xb": shape.d_xb, "d_conv": shape.d_conv}
    if shape.dt_rank is not None:
        ssm_cfg["dt_rank"] = shape.dt_rank
    return HybridConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=False, hybrid_block_layout=shape.block_layout(), ssm_cfg=ssm_cfg,
    )


def teacher_config(shape: Shape):
    """The all-attention teacher of `shape`: transformers' Mistral (Apriel-Nemotron-15B-Thinker at the default)."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=False, sliding_window=None, attn_implementation="sdpa",
    )


def parameter_count(shape: Shape) -> int:
    """Parameters of the hybrid with `shape`, counted on the meta device from h1rl's own model."""
    from h1rl.models import HybridForCausalLM

    with torch.device("meta"):
        model = HybridForCausalLM(hybrid_config(shape))
    return sum(p.numel() for p in model.parameters())


# ---- the arithmetic table (no --measure) ---------------------------------------------------------------------


def estimate(shape: Shape, gpus: int, micro_batch: int, seq_len: int, rollout_rows: int, reference_model: bool,
             activation_checkpointing: bool = True) -> list[tuple[str, str, float]]:
    """(what, arithmetic, GiB per GPU) rows: textbook arithmetic, no measurement (see `measure` for that)."""
    P = parameter_count(shape)
    N, B, T = gpus, micro_batch, seq_len
    attn = shape.block_layout().count("t")
    m2 = shape.block_layout().count("m2")
    rows = [
        ("parameters", f"P = {P / 1e9:.2f}B (counted)", 0.0),
        ("ZeRO-2: weights + grads/N + Adam/N", f"2P + (2P + 12P) / {N}", (2 * P + 14 * P / N) / GiB),
        ("ZeRO-3: all sharded", f"16P / {N}", 16 * P / N / GiB),
        ("ZeRO-3 offload: GPU (weights gathered per layer)", "2 layers' bf16 weights = 2 * (P / layers) * 2",
         2 * P / shape.layers * 2 / GiB),
        ("ZeRO-3 rollout phase: whole model gathered", "2P (TRL gathers once per rollout, not per token)",
         2 * P / GiB),
        ("ZeRO-3 offload: host RAM per 8-GPU node", f"(12P + 2P) * 8 / {N}", 14 * P * 8 / N / GiB),
    ]
    if reference_model:
        rows.append(("reference model (beta > 0), ZeRO-3", f"2P / {N}", 2 * P / N / GiB))
    layer = B * T * (4 * shape.hidden + 2 * shape.intermediate + 3 * shape.d_inner) * 2  # one layer's activations
    per_layer = "B*T*(4*hidden + 2*intermediate + 3*d_inner)*2"
    if activation_checkpointing:
        acts = B * T * shape.hidden * 2 * shape.layers
        rows.append(("activations, checkpointed",
                     f"B*T*hidden*2 bytes*layers = {B}*{T}*{shape.hidden}*2*{shape.layers}", acts / GiB))
        rows.append(("one layer's live activations in backward", per_layer, layer / GiB))
    else:
        rows.append(("activations, all layers", f"{per_layer}*layers", layer * shape.layers / GiB))
    logits = B * T * shape.vocab * 4
    rows.append(("logits for log-probs (fp32)", f"B*T*vocab*4 = {B}*{T}*{shape.vocab}*4", logits / GiB))
    kv = rollout_rows * T * attn * 2 * shape.kv_heads * shape.head_dim * 2
    ssm = rollout_rows * m2 * (shape.d_inner * shape.d_conv * 2 + shape.d_inner * shape.d_state * 4)
    rows.append(("rollout cache: attention K,V (bf16)",
                 f"rows*T*{attn} layers*2*kv_heads*head_dim*2 = {rollout_rows}*{T}*{attn}*2*{shape.kv_heads}*"
                 f"{shape.head_dim}*2", kv / GiB))
    rows.append(("rollout cache: m2 states (conv bf16, SSM fp32)",
                 f"rows*{m2} layers*(d_inner*d_conv*2 + d_inner*d_state*4)", ssm / GiB))
    teacher_kv = rollout_rows * T * shape.layers * 2 * shape.kv_heads * shape.head_dim * 2
    rows.append(("  (the all-attention teacher's K,V, for comparison)", f"rows*T*{shape.layers}*2*kv_heads*head_dim*2",
                 teacher_kv / GiB))
    return rows


# ---- counting live bytes -------------------------------------------------------------------------------------


def _rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512  # CUDA's caching allocator hands out multiples of 512 bytes


class LiveBytes(TorchDispatchMode):
    """Inside the block, the bytes of the tensor storages made there and still alive: `current`, `peak`, and per
    `stage` (the label given by `with live.stage(name)` when a storage was made) the live bytes at the peak and the
    peak during that stage. Storages made before the block (the weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, stage that made it)
        self._refs: dict[int, weakref.ref] = {}
        self.label = "other"
        self.current = self.peak = 0
        self.by_label: dict[str, int] = defaultdict(int)
        self.peak_by_label: dict[str, int] = {}
        self.stage_peak: dict[str, int] = {}  # most bytes alive while each stage ran
        self.peak_stage = ""  # the stage during which the peak occurred

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        self.stage_peak[label] = max(self.stage_peak.get(label, 0), self.current)
        try:
            yield
        finally:
            self.label = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in inputs:  # views and in-place results share an input's storage: not new
                    self._track(storage)
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self.live:
            return
        nbytes = _rounded(storage.nbytes())
        self.live[key] = (nbytes, self.label)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.current += nbytes
        self.by_label[self.label] += nbytes
        self.stage_peak[self.label] = max(self.stage_peak.get(self.label, 0), self.current)
        if self.current > self.peak:
            self.peak, self.peak_stage = self.current, self.label
            self.peak_by_label = {k: v for k, v in self.by_label.items() if v}

    def _free(self, key: int) -> None:
        nbytes, label = self.live.pop(key)
        self._refs.pop(key, None)
        self.current -= nbytes
        self.by_label[label] -= nbytes


def tensor_bytes(*tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (rounded as `LiveBytes` rounds them)."""
    seen = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[id(st)] = _rounded(st.nbytes())
    return sum(seen.values())


def cache_bytes(cache) -> int:
    """Bytes of a `HybridCache`'s buffers."""
    return tensor_bytes(*(t for state in cache.layers if state is not None for t in state.tensors()))


# ---- what the fused CUDA kernels allocate (stand-ins used during the measurement) ------------------------------


class FusedAttention(torch.autograd.Function):
    """What PyTorch's flash / memory-efficient SDPA allocate and save (see the module docstring); no values."""

    @staticmethod
    def forward(ctx, q, k, v, kernel: str, bias):  # q (B, H, T, P), k and v (B, Hkv, S, P)
        B, H, T, _ = q.shape
        out = q.new_empty(B, T, H, v.shape[-1]).transpose(1, 2)  # (B, H, T, P) in the kernels' (B, T, H, P) layout
        lse_len = T if kernel == "flash" else -(-T // 32) * 32  # the memory-efficient kernel pads to 32
        lse = q.new_empty(B, H, lse_len, dtype=torch.float32)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q, k, v, out, lse, *(() if bias is None else (bias,)))
        return out

    @staticmethod
    def backward(ctx, dout):  # flash-attn 2's mha_bwd
        q, k, v, out, lse, *_ = ctx.saved_tensors
        B, H, T, P = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        rounded = -(-T // 128) * 128
        softmax_d = q.new_empty(B, H, rounded, dtype=torch.float32)  # noqa: F841 - alive until the return
        dq_accum = q.new_empty(B, rounded, H, P, dtype=torch.float32)  # noqa: F841
        dq = torch.empty_like(q)
        if Hkv != H:  # grouped heads: full-head gradients, then summed over each group
            dk_full, dv_full = q.new_empty(B, S, H, P), q.new_empty(B, S, H, P)
            dk = dk_full.view(B, S, Hkv, H // Hkv, P).sum(3).transpose(1, 2)  # (B, Hkv, S, P)
            dv = dv_full.view(B, S, Hkv, H // Hkv, P).sum(3).transpose(1, 2)
        else:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
        return dq, dk, dv, None, None


class SelectiveScanKernel(torch.autograd.Function):
    """What mamba-ssm's `SelectiveScanFn` allocates and saves (no D, z or delta_bias: h1rl passes none)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # u, delta (b, d, L); A (d, N); B, C (b, G, N, L)
        u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
        b, d, L = u.shape
        out = torch.empty_like(u)  # (b, d, L)
        x = u.new_empty(b, d, -(-L // 2048), 2 * A.shape[-1], dtype=torch.float32)  # a state every 2048 steps
        ctx.save_for_backward(u, delta, A, B, C, x)
        return out, x[:, :, -1, 1::2]  # y, last state (b, d, N)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, _ = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA = torch.zeros_like(A, dtype=torch.float32)
        dB = torch.zeros_like(B, dtype=torch.float32)
        dC = torch.zeros_like(C, dtype=torch.float32)
        return du, ddelta, dA, dB, dC


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba-ssm's `selective_scan_fn` as h1rl's `_cuda_scan` calls it, allocating what the kernel allocates."""
    if D is not None or z is not None or delta_bias is not None or delta_softplus:
        raise NotImplementedError("the stand-in models the call h1rl makes (no D, z, delta_bias, softplus)")
    out, last = SelectiveScanKernel.apply(u, delta, A, B, C)
    return (out, last) if return_last_state else out


def _no_temporaries(*args, **kwargs) -> None:
    """TRL's Triton folds and CUDA addmm(out_dtype=float32) write into buffers that already exist."""


def _tensor_free(call: AttentionCall) -> AttentionCall:
    """The same `AttentionCall` with meta tensors (same shapes, strides, offsets, dtypes): it keeps no storage alive."""

    def meta(t):
        if not isinstance(t, torch.Tensor) or isinstance(t, CausalBias):
            return t
        with unset_fake_temporarily():
            size = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
            return torch.empty(size, dtype=t.dtype, device="meta").as_strided(t.shape, t.stride(), t.storage_offset())

    return AttentionCall(meta(call.query), meta(call.key), meta(call.value), meta(call.attn_mask), call.is_causal,
                         call.enable_gqa)


class MathKernelError(RuntimeError):
    """An attention call that no fused kernel takes: on CUDA it would run on the math kernel, O(T * S) memory."""


@contextlib.contextmanager
def fused_kernels_counted():
    """Within the block, stand the fused kernels in by what they allocate (see the module docstring) and record
    every attention call: h1rl's through `record_attention_calls`, the teacher's (transformers' SDPA) here. Yields the
    list of recorded calls (tensor-free copies, so that recording keeps no memory alive). Everything patched is
    restored on exit."""
    import transformers.masking_utils as masking_utils
    from trl.kernels import chunked_logprob

    import h1rl.models.attention as attention
    import h1rl.models.scan as scan

    recorded: list[list] = [[]]  # [the list record_attention_calls yields]: h1rl's calls and the teacher's

    def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        call = AttentionCall(query, key, value, attn_mask, is_causal, enable_gqa)
        calls = recorded[0]
        if calls and calls[-1].query is query:  # h1rl's call, just appended by record_attention_calls
            calls[-1] = _tensor_free(call)
        kernels = fused_kernels(call)
        if not kernels:
            raise MathKernelError(f"no fused kernel takes this attention call: {call.describe()}")
        bias = None
        if isinstance(attn_mask, torch.Tensor) and not isinstance(attn_mask, CausalBias):  # memory-efficient: the
            # boolean mask becomes an additive bias in the query's dtype
            *lead, S = attn_mask.shape
            bias = attn_mask.new_empty(*lead, -(-S // 16) * 16, dtype=query.dtype)
        kernel = "flash" if "flash" in kernels else "efficient"
        return FusedAttention.apply(query, key, value, kernel, bias)

    def transformers_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):
        recorded[0].append(_tensor_free(AttentionCall(query, key, value, attn_mask, is_causal, enable_gqa)))
        return fused_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def causal_lower_right(*args):  # a Tensor subclass with no data, made outside the dispatch modes (they reject it)
        with _disable_current_modes():
            return CausalBias(CausalVariant.LOWER_RIGHT, *args)

    patches = [
        (attention, "scaled_dot_product_attention", fused_sdpa),
        (attention, "causal_lower_right", causal_lower_right),
        (F, "scaled_dot_product_attention", transformers_sdpa),
        (scan, "_mamba_scan_fn", selective_scan_fn),
        (scan, "_is_cuda", lambda x: True),  # h1rl's seam for standing the CUDA scan in on CPU tensors
        (chunked_logprob, "_forward_tile", _no_temporaries),
        (chunked_logprob, "_backward_tile", _no_temporaries),
        (chunked_logprob, "_addmm_fp32", _no_temporaries),
        # transformers takes fake tensors for tracing and then assumes packed rows (a full (B, 1, T, T) mask); on real
        # tensors its check reads the position ids and finds one sequence per row, as here: no mask, flash
        (masking_utils, "find_packed_sequence_indices", lambda position_ids: None),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, new in patches:
            setattr(module, name, new)
        with record_attention_calls() as calls:  # wraps fused_sdpa: appends the call, then calls it
            recorded[0] = calls
            yield calls
    finally:
        for module, name, old in saved:
            setattr(module, name, old)


def kernel_summary(calls: list) -> dict[str, int]:
    """Counts of recorded calls by the fused kernels that take them ("flash+efficient", "efficient", "flash")."""
    counts: Counter = Counter()
    for call in calls:
        kernels = fused_kernels(call)
        if not kernels:
            raise MathKernelError(f"no fused kernel takes this attention call: {call.describe()}")
        counts["+".join(sorted(kernels, key=["flash", "efficient"].index))] += 1
    return dict(counts)


# ---- the phases ----------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One phase's measurement: bytes at the peak, what part of them is cache, and where the peak was."""

    peak: int  # bytes alive at the peak, weights excluded
    cache: int = 0  # of which KV / Mamba state (rollout: the decode slots, the prefill cache, the held prompt)
    analytic: int = 0  # added on top, not measured (the left-padded batch's gathers)
    peak_stage: str = ""
    stage_peaks: dict[str, int] = field(default_factory=dict)
    attention_calls: dict[str, int] = field(default_factory=dict)  # kernels -> calls
    extra: dict = field(default_factory=dict)

    @property
    def activations(self) -> int:
        return self.peak - self.cache + self.analytic


def _release_grads(model):
    """Drop each parameter's gradient once accumulated (ZeRO-3 reduce-scatters it into a shard); returns the hooks."""

    def release(p):
        p.grad = None

    return [p.register_post_accumulate_grad_hook(release) for p in model.parameters() if p.requires_grad]


def measure_training(model, seq_len: int, prompt_len: int, micro_batch: int, calls: list) -> Measured:
    """One GRPO micro-batch: TRL's fused-head forward (log-probs and entropies), a clipped GRPO loss, backward."""
    B, T, Tc = micro_batch, seq_len, seq_len - prompt_len
    V, D = model.config.vocab_size, model.config.hidden_size
    model.train()
    hooks = _release_grads(model)
    first = len(calls)
    try:
        with LiveBytes() as live:
            with live.stage("inputs"):
                ids = torch.randint(V, (B, T))  # (B, T): the prompt's Tp tokens, then the completion's Tc
                labels = ids.clone()
                labels[:, :-Tc] = -100  # TRL scores the completion only
                advantages = torch.randn(B, 1)
                old_logps = torch.zeros(B, Tc)
            with live.stage("forward"):
                out = model(input_ids=ids, attention_mask=None, labels=labels, fused_lm_head=True)
                logps = out.log_probs[:, -Tc:]  # (B, Tc)
                ratio = torch.exp(logps - old_logps)
                clipped = torch.clamp(ratio, 0.8, 1.28)
                loss = -torch.min(ratio * advantages, clipped * advantages).mean()  # dapo: mean over tokens
            with live.stage("backward"):
                loss.backward()
            del out, logps, ratio, clipped, loss
    finally:
        for hook in hooks:
            hook.remove()
    gathers = 2 * B * T * D * model.dtype.itemsize  # left_align of the embeddings, restore of the hidden states
    return Measured(live.peak, 0, gathers, live.peak_stage, dict(live.stage_peak), kernel_summary(calls[first:]))


def measure_rollout(model, seq_len: int, prompt_len: int, generations: int, rows: int, budget,
                    calls: list) -> Measured:
    """One rollout phase's peak within `budget` (see the module docstring for what is run)."""
    from h1rl.rollout.decode_step import StaticDecoder
    from h1rl.rollout.engine import RolloutEngine
    from h1rl.rollout.sampling import SamplingParams, sample_next

    engine = RolloutEngine(model, pad_token_id=0, budget=budget)
    S, Tp = seq_len, prompt_len
    max_new = S - Tp
    slots = engine.plan_rows(rows, Tp, S, generations)  # the engine's own planning: max_rows, or memory_gb / bytes
    prompts_at_once = -(-slots // generations)  # the first admission fills every slot: its distinct prompts
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0)  # TRL's defaults: no top-k/p, min-p, penalty
    model.eval()
    first = len(calls)
    with torch.no_grad(), LiveBytes() as live:
        with live.stage("decode cache"):
            decoder = StaticDecoder(model, slots, S)
        with live.stage("bookkeeping"):  # as h1rl.rollout.phase.Phase allocates it
            completion = torch.zeros(rows, max_new, dtype=torch.long)
            logprobs = torch.zeros(rows, max_new)
            uniform_table = torch.empty(max_new, rows)
            per_slot = [torch.zeros(slots, dtype=torch.long) for _ in range(4)]
        with live.stage("prefill"):
            prompts = [[1] * Tp for _ in range(prompts_at_once)]
            prefill_cache, first_logits, _ = engine._drive(engine._prefill(prompts))
        with live.stage("slot copy"):
            mine = min(generations, slots)
            decoder.cache.copy_rows_(torch.arange(mine), prefill_cache, torch.zeros(mine, dtype=torch.long), Tp)
            held = prefill_cache.index_select(torch.zeros(1, dtype=torch.long))  # a prompt whose rows still wait
        with live.stage("decode step"):
            logits = decoder.forward(slots, S)  # (slots, V): every row reads the whole KV buffer
        with live.stage("sampling"):
            tokens, lp = sample_next(logits, params, torch.rand(slots))
        cache = cache_bytes(decoder.cache) + cache_bytes(prefill_cache) + cache_bytes(held)
        del completion, logprobs, uniform_table, per_slot, first_logits, logits, tokens, lp
    extra = {"slots": slots, "prompts_prefilled_at_once": prompts_at_once,
             "decode_cache": cache_bytes(decoder.cache), "prefill_cache": cache_bytes(prefill_cache)}
    return Measured(live.peak, cache, 0, live.peak_stage, dict(live.stage_peak), kernel_summary(calls[first:]), extra)


def measure_distill(student, teacher, batch_size: int, seq_len: int, calls: list, loss_config=None) -> Measured:
    """One distillation micro-batch: `batch_loss` (student checkpointed, teacher frozen) and backward."""
    from h1rl.distill.config import LossConfig
    from h1rl.distill.losses import chunk_length
    from h1rl.distill.trainer import batch_loss

    loss_config = loss_config or LossConfig()
    student.train()
    teacher.eval()
    teacher.requires_grad_(False)
    hooks = _release_grads(student)
    first = len(calls)
    try:
        with LiveBytes() as live:
            with live.stage("inputs"):
                ids = torch.randint(student.config.vocab_size, (batch_size, seq_len))  # (B, T)
                batch = {"input_ids": ids, "labels": ids.clone()}  # unpadded rows: no attention mask
            with live.stage("forward"):
                parts = batch_loss(student, teacher, batch, loss_config, rows=batch_size)
            with live.stage("backward"):
                parts["loss"].backward()
            del parts
    finally:
        for hook in hooks:
            hook.remove()
    extra = {"chunk_positions": chunk_length(loss_config, batch_size, student.config.vocab_size),
             "chunk_bytes": loss_config.chunk_bytes}
    return Measured(live.peak, 0, 0, live.peak_stage, dict(live.stage_peak), kernel_summary(calls[first:]), extra)


# ---- ZeRO-3 accounting ---------------------------------------------------------------------------------------


@dataclass
class ModelSizes:
    """Parameter counts the ZeRO-3 accounting needs (from the models themselves)."""

    student: int
    teacher: int
    lm_head: int  # the student's (the teacher's is the same size)
    largest_layer: int

    @classmethod
    def of(cls, student, teacher) -> ModelSizes:
        layers = student.model.layers
        return cls(
            student=sum(p.numel() for p in student.parameters()),
            teacher=sum(p.numel() for p in teacher.parameters()),
            lm_head=student.lm_head.weight.numel(),
            largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        )


PHASES = ("training", "rollout", "distillation")


def phase_rows(phase: str, sizes: ModelSizes, gpus: int, measured: Measured, gather_for_generation: bool = True
               ) -> list[tuple[str, str, int]]:
    """(item, how, bytes per GPU) of one phase at `gpus` GPUs under ZeRO-3; the last row is the total."""
    P, N = sizes.student, gpus
    rows = [
        ("parameters (bf16, 1/N)", f"2 x {P / 1e9:.2f}B / {N}", 2 * P // N),
        ("gradients (bf16, 1/N)", f"2 x P / {N}", 2 * P // N),
        ("optimizer states (fp32 master + Adam, 1/N)", f"12 x P / {N}", 12 * P // N),
    ]
    training_gathered = 2 * (sizes.lm_head + sizes.largest_layer)
    if phase == "training":
        rows.append(("gathered weights", "LM head + largest layer (bf16)", training_gathered))
    elif phase == "rollout":
        rows.append(("gathered weights", "whole model, 2P (ds3_gather_for_generation)" if gather_for_generation
                     else "LM head + largest layer (not gathered for generation)",
                     2 * P if gather_for_generation else training_gathered))
    else:
        rows.append(("teacher parameters (bf16, 1/N)", f"2 x {sizes.teacher / 1e9:.2f}B / {N}", 2 * sizes.teacher // N))
        rows.append(("gathered weights", "both LM heads (bf16; each loss chunk calls both)", 4 * sizes.lm_head))
    rows.append(("activations / temporaries", "measured" + (" + analytic gathers" if measured.analytic else ""),
                 measured.activations))
    rows.append(("KV / state cache", "measured", measured.cache))
    rows.append(("total per GPU", "", sum(b for _, _, b in rows)))
    return rows


def fixed_bytes(phase: str, sizes: ModelSizes, gpus: int, gather_for_generation: bool = True) -> int:
    """A phase's bytes per GPU besides what is measured."""
    empty = Measured(0)
    return phase_rows(phase, sizes, gpus, empty, gather_for_generation)[-1][2]


@dataclass
class RolloutFit:
    """Rollout bytes as a function of slots: `base + per_slot * slots`, fitted on two measured slot counts."""

    base: float
    per_slot: float

    def slots_within(self, available: float, rows: int, generations: int) -> int:
        """The most slots (whole groups of `generations` first, else fewer) whose bytes fit in `available`."""
        most = min(rows, int((available - self.base) // self.per_slot)) if available > self.base else 0
        if most >= generations:
            return most // generations * generations
        return max(most, 0)


def usable(size: int, reserve_gib: float) -> int:
    return int(size - reserve_gib * GiB)


def fewest_gpus(fits, start: int = 8, most: int = 512) -> int | None:
    """The fewest GPUs, a multiple of 8, for which `fits(N)`; None if none up to `most`."""
    return next((n for n in range(start, most + 1, 8) if fits(n)), None)


# ---- the command ---------------------------------------------------------------------------------------------


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def build_models(shape: Shape, gradient_checkpointing: bool = True):
    """The student (h1rl hybrid, TRL's fused head added) and the teacher (transformers' Mistral), in bf16, built on
    fake tensors: call inside a `FakeTensorMode`."""
    return models_from_configs(hybrid_config(shape), teacher_config(shape), gradient_checkpointing)


def models_from_configs(student_config, teacher_config=None, gradient_checkpointing: bool = True):
    """`build_models` for any hybrid config and teacher config (any transformers causal LM; None: no teacher), as the
    recipes' dry runs use it (`h1rl.dry_run`)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from h1rl.models import HybridForCausalLM

    student = HybridForCausalLM._from_config(student_config, dtype=torch.bfloat16)
    if gradient_checkpointing:
        student.activation_checkpointing_enable()  # what gradient_checkpointing_enable calls (non-reentrant)
    add_fused_lm_head(student, temperature=1.0, outputs=("log_probs", "entropy"))  # as GRPOTrainer.__init__
    teacher = None
    if teacher_config is not None:  # sdpa: the fused-kernel path the measurement stands in
        teacher = AutoModelForCausalLM.from_config(teacher_config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return student, teacher


@dataclass
class Settings:
    """What `measure` runs: the command line's knobs (see `main`)."""

    seq_lens: list[int] = field(default_factory=lambda: [8192, 32768])  # tokens per row: prompt + completion
    prompt_len: int = 1024
    micro_batch: int = 1  # training rows per GPU per forward/backward
    generations: int = 16  # G
    rollout_rows: int = 64  # rows per GPU per rollout phase
    max_rows: int | None = None  # RolloutBudget; None (and memory_gb None): the slots that fit, worked out here
    memory_gb: float | None = None
    prefill_chunk: int = 2048
    gather_for_generation: bool = True  # TRL's ds3_gather_for_generation
    distill_batch: int = 8
    distill_seq_len: int = 8192
    gpus: int | None = None  # None: per length, the fewest that fit every phase on 80 GB
    reserve_gib: float = 3.0  # per GPU, outside PyTorch's tensors: CUDA context, NCCL buffers, fragmentation
    min_rollout_rows: int | None = None  # slots a rollout needs to count as fitting; None: G

    @property
    def min_slots(self) -> int:
        return min(self.min_rollout_rows or self.generations, self.rollout_rows)


GPU_COUNTS = (8, 16, 24, 32, 40, 48, 64)  # columns of the slots-by-GPUs table


def plan(sizes: ModelSizes, training: Measured, distill: Measured, fit: RolloutFit, room: int, s: Settings) -> dict:
    """The fewest GPUs for which each phase fits in `room` bytes per GPU, and the rollout's slots by GPU count."""
    def rollout_fits(gather: bool):
        return lambda n: fit.slots_within(room - fixed_bytes("rollout", sizes, n, gather), s.rollout_rows,
                                          s.generations) >= s.min_slots

    fewest = {
        "training": fewest_gpus(lambda n: fixed_bytes("training", sizes, n) + training.activations <= room),
        "distillation": fewest_gpus(lambda n: fixed_bytes("distillation", sizes, n) + distill.activations <= room),
        "rollout, gathered": fewest_gpus(rollout_fits(True)),
        "rollout, not gathered": fewest_gpus(rollout_fits(False)),
    }
    rollout = "rollout, gathered" if s.gather_for_generation else "rollout, not gathered"
    needed = [fewest["training"], fewest["distillation"], fewest[rollout]]
    fewest["every phase"] = None if None in needed else max(needed)
    slots = {n: fit.slots_within(room - fixed_bytes("rollout", sizes, n, s.gather_for_generation), s.rollout_rows,
                                 s.generations) for n in GPU_COUNTS}
    return {"fewest_gpus": fewest, "slots_by_gpus": slots}


def measure(shape: Shape, s: Settings, progress=print) -> dict:
    """Measure every phase (see the module docstring), fit the rollout's bytes per slot, and work out the fewest GPUs
    and the rollout budget per GPU size. Returns everything as a JSON-able dict."""
    from h1rl.rollout.engine import RolloutBudget, bytes_per_row

    start = time.perf_counter()

    def done(what: str) -> None:
        progress(f"{what} [{time.perf_counter() - start:.0f} s]")

    result: dict = {"shape": asdict(shape) | {"layout": shape.block_layout()}, "settings": asdict(s)}
    torch.manual_seed(0)
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True), fused_kernels_counted() as calls:
        warnings.simplefilter("ignore")
        student, teacher = build_models(shape)
        sizes = ModelSizes.of(student, teacher)
        result["parameters"] = asdict(sizes)
        done(f"models built on fake tensors: student {sizes.student / 1e9:.2f}B, teacher {sizes.teacher / 1e9:.2f}B")
        distill = measure_distill(student, teacher, s.distill_batch, s.distill_seq_len, calls)
        done(f"distillation {s.distill_batch} x {s.distill_seq_len}: peak {_gib(distill.peak)} GiB")

        def rollout(T: int, budget: RolloutBudget, rows: int = s.rollout_rows) -> Measured:
            return measure_rollout(student, T, s.prompt_len, s.generations, rows, budget, calls)

        measured = {}
        for T in s.seq_lens:
            training = measure_training(student, T, s.prompt_len, s.micro_batch, calls)
            done(f"T={T} training: peak {_gib(training.peak)} GiB")
            # the rollout's bytes against its slots, from one and two whole groups (one and two prompts at once)
            points = [rollout(T, RolloutBudget(max_rows=k * s.generations, prefill_chunk=s.prefill_chunk),
                              k * s.generations) for k in (1, 2)]
            per_slot = (points[1].peak - points[0].peak) / s.generations
            fit = RolloutFit(points[0].peak - per_slot * s.generations, per_slot)
            done(f"T={T} rollout: {_gib(fit.per_slot)} GiB per slot + {_gib(fit.base)} GiB")
            measured[T] = (training, fit, points)

        result["plans"] = {name: {"usable_bytes": usable(size, s.reserve_gib), "per_seq_len": {
            T: plan(sizes, training, distill, fit, usable(size, s.reserve_gib), s)
            for T, (training, fit, _) in measured.items()}} for name, size in GPU_SIZES.items()}

        # per length, the tables at --gpus or at the fewest GPUs that fit every phase on 80 GB, with the rollout
        # measured again at the slots that fit there (fewer if the linear fit was optimistic)
        room = usable(GPU_SIZES["80 GB"], s.reserve_gib)
        result["per_seq_len"] = {}
        for T, (training, fit, points) in measured.items():
            N = s.gpus or result["plans"]["80 GB"]["per_seq_len"][T]["fewest_gpus"]["every phase"] or GPU_COUNTS[-1]
            rollout_room = room - fixed_bytes("rollout", sizes, N, s.gather_for_generation)
            if s.max_rows is not None or s.memory_gb is not None:  # the budget given on the command line
                budget = RolloutBudget(max_rows=s.max_rows, memory_gb=s.memory_gb, prefill_chunk=s.prefill_chunk)
            else:
                slots = max(1, fit.slots_within(rollout_room, s.rollout_rows, s.generations))
                budget = RolloutBudget(max_rows=slots, prefill_chunk=s.prefill_chunk)
            measured_rollout = rollout(T, budget)
            while s.max_rows is None and s.memory_gb is None and measured_rollout.peak > rollout_room \
                    and measured_rollout.extra["slots"] > 1:
                slots = measured_rollout.extra["slots"]
                budget = RolloutBudget(max_rows=slots - (s.generations if slots > s.generations else 1),
                                       prefill_chunk=s.prefill_chunk)
                measured_rollout = rollout(T, budget)
            slots = measured_rollout.extra["slots"]
            estimate_row = bytes_per_row(student.config, T, s.prompt_len, s.prefill_chunk, 2, s.generations)
            phases = {"training": training, "rollout": measured_rollout, "distillation": distill}
            result["per_seq_len"][T] = {
                "gpus": N,
                "measured": {name: asdict(m) | {"activations": m.activations} for name, m in phases.items()},
                "rows": {name: phase_rows(name, sizes, N, m, s.gather_for_generation) for name, m in phases.items()},
                "rollout_fit": asdict(fit),
                "rollout_fit_points": [asdict(p) for p in points],
                "bytes_per_row": estimate_row,
                "measured_per_slot": measured_rollout.peak / slots,
                "budget": {"max_rows": slots, "memory_gb": round(s.memory_gb or rollout_room / GiB, 1),
                           "prefill_chunk": s.prefill_chunk,
                           "engine_slots_from_memory_gb": int((s.memory_gb or rollout_room / GiB) * GiB
                                                              // estimate_row)},
            }
            done(f"T={T} tables at N = {N}")
        result["recipes"] = {}
        for name, size in GPU_SIZES.items():
            for T, (training, fit, _) in measured.items():
                N = result["plans"][name]["per_seq_len"][T]["fewest_gpus"]["every phase"]
                if N is None:
                    continue
                rollout_room = usable(size, s.reserve_gib) - fixed_bytes("rollout", sizes, N, s.gather_for_generation)
                slots = fit.slots_within(rollout_room, s.rollout_rows, s.generations)
                peaks = {"training": fixed_bytes("training", sizes, N) + training.activations,
                         "rollout": fixed_bytes("rollout", sizes, N, s.gather_for_generation) + fit.base
                         + fit.per_slot * slots,
                         "distillation": fixed_bytes("distillation", sizes, N) + distill.activations}
                result["recipes"][f"{name}, T={T}"] = {"gpus": N, "max_rows": slots,
                                                       "memory_gb": round(rollout_room / GiB, 1),
                                                       "prefill_chunk": s.prefill_chunk, "peaks": peaks}
    result["seconds"] = time.perf_counter() - start
    return result


def report(result: dict) -> str:
    """The measured tables as markdown."""
    s = result["settings"]
    sizes = result["parameters"]
    layout = "".join({"m2": "M", "t": "A", "i": "-"}[c] for c in result["shape"]["layout"])
    lines = [f"Student {sizes['student'] / 1e9:.2f}B parameters (layout {layout}: M m2, A attention), teacher "
             f"{sizes['teacher'] / 1e9:.2f}B (all attention); bf16; ZeRO-3 over N GPUs; GiB per GPU."]
    items = ["parameters (bf16, 1/N)", "gradients (bf16, 1/N)", "optimizer states (fp32 master + Adam, 1/N)",
             "teacher parameters (bf16, 1/N)", "gathered weights", "activations / temporaries", "KV / state cache",
             "total per GPU"]
    for T, entry in result["per_seq_len"].items():
        m, N, b = entry["measured"], entry["gpus"], entry["budget"]
        slots = m["rollout"]["extra"]["slots"]
        lines += ["", f"### T = {T} tokens per row (prompt {s['prompt_len']} + completion {int(T) - s['prompt_len']}),"
                      f" N = {N}", "",
                  f"| per GPU | training: {s['micro_batch']} x {T}, checkpointed | rollout: {slots} slots x {T} | "
                  f"distillation: {s['distill_batch']} x {s['distill_seq_len']} |", "|---|---|---|---|"]
        by_phase = {phase: {item: (how, nbytes) for item, how, nbytes in rows} for phase, rows in entry["rows"].items()}
        for item in items:
            cells = []
            for phase in PHASES:
                how, nbytes = by_phase[phase].get(item, ("", None))
                note = f" ({how})" if item == "gathered weights" else ""
                cells.append("-" if nbytes is None else _gib(nbytes) + note)
            lines.append(f"| {f'**{item}**' if item == 'total per GPU' else item} | " + " | ".join(cells) + " |")
        rooms = {name: plan["usable_bytes"] for name, plan in result["plans"].items()}
        fits = [" / ".join("yes" if entry["rows"][phase][-1][2] <= room else "no" for room in rooms.values())
                for phase in PHASES]
        lines.append(f"| fits {' / '.join(rooms)} ({' / '.join(_gib(r) for r in rooms.values())} GiB usable) | "
                     + " | ".join(fits) + " |")
        calls = " | ".join(", ".join(f"{n} {k}" for k, n in m[phase]["attention_calls"].items()) for phase in PHASES)
        lines.append(f"| attention calls (fused kernels that take them) | {calls} |")
        lines.append("| peak during | " + " | ".join(m[phase]["peak_stage"] for phase in PHASES) + " |")
        rollout = m["rollout"]
        lines += [
            "",
            f"- Training: {_gib(m['training']['analytic'])} GiB of its activations are analytic (TRL's left-padded "
            f"batch runs left-aligned: two (B, T, D) gathers); the rest is measured.",
            f"- Rollout: decode cache {_gib(rollout['extra']['decode_cache'])} GiB ({slots} slots), prefill cache "
            f"{_gib(rollout['extra']['prefill_cache'])} GiB ({rollout['extra']['prompts_prefilled_at_once']} prompts "
            f"at once); measured {_gib(rollout['peak'])} GiB = {_gib(entry['measured_per_slot'])} GiB per slot "
            f"(fit: {_gib(entry['rollout_fit']['per_slot'])} GiB per slot + {_gib(entry['rollout_fit']['base'])}); "
            f"`bytes_per_row` says {_gib(entry['bytes_per_row'])} GiB x {slots} = "
            f"{_gib(entry['bytes_per_row'] * slots)} GiB "
            f"({entry['bytes_per_row'] / entry['measured_per_slot'] - 1:+.0%}).",
            f"- Rollout budget on 80 GB at N = {N}: `RolloutBudget(max_rows={b['max_rows']}, "
            f"memory_gb={b['memory_gb']}, prefill_chunk={b['prefill_chunk']})`; memory_gb alone gives "
            f"{b['engine_slots_from_memory_gb']} slots "
            f"through `bytes_per_row`.",
        ]
    lines += ["", "### Fewest GPUs (a multiple of 8) for which each phase fits", "",
              f"Usable: the device total (nvidia-smi) less {s['reserve_gib']} GiB; a rollout fits with at least "
              f"{min(s['min_rollout_rows'] or s['generations'], s['rollout_rows'])} slots; distillation "
              f"{s['distill_batch']} x {s['distill_seq_len']} in every row.", ""]
    first = next(iter(next(iter(result["plans"].values()))["per_seq_len"].values()))
    columns = list(first["fewest_gpus"])
    lines += ["| GPU | T | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, p in result["plans"].items():
        for T, e in p["per_seq_len"].items():
            lines.append(f"| {name} | {T} | " + " | ".join(str(e["fewest_gpus"][c] or "> 512") for c in columns) + " |")
    counts = list(first["slots_by_gpus"])
    gathered = "gathered" if s["gather_for_generation"] else "not gathered"
    lines += ["", f"Rollout slots that fit by GPU count (weights {gathered} for generation):", "",
              "| GPU | T | " + " | ".join(f"N={n}" for n in counts) + " |", "|---|---|" + "---|" * len(counts)]
    for name, p in result["plans"].items():
        for T, e in p["per_seq_len"].items():
            lines.append(f"| {name} | {T} | " + " | ".join(str(v) for v in e["slots_by_gpus"].values()) + " |")
    lines += ["", "Recipes (the fewest GPUs for every phase; the rollout budget that fits there):", "",
              "| GPU, T | N | RolloutBudget | training | rollout | distillation |", "|---|---|---|---|---|---|"]
    for key, r in result["recipes"].items():
        lines.append(f"| {key} | {r['gpus']} | max_rows={r['max_rows']}, memory_gb={r['memory_gb']}, prefill_chunk="
                     f"{r['prefill_chunk']} | " + " | ".join(_gib(r["peaks"][p]) for p in PHASES) + " |")
    lines += ["", f"Measured in {result['seconds']:.0f} s on {_cpu_count()} CPU threads."]
    return "\n".join(lines)


def _cpu_count() -> int:
    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="h1rl bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="measure the real code paths on fake tensors")
    parser.add_argument("--gpus", type=int, default=None,
                        help="data-parallel GPUs (N nodes x 8); --measure default: the fewest that fit 80 GB; "
                             "arithmetic default 16")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768],
                        help="--measure: tokens per row, prompt + completion")
    parser.add_argument("--seq-len", type=int, default=8192, help="arithmetic: prompt + completion tokens")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=1, help="training rows per GPU per forward/backward")
    parser.add_argument("--m2-layers", type=int, default=Shape.m2_layers, help="H-30: 30 m2 + 20 attention layers")
    parser.add_argument("--layout", default=None, help="one code per layer, comma-separated (overrides --m2-layers)")
    parser.add_argument("--generations", type=int, default=16, help="G: completions per prompt")
    parser.add_argument("--rollout-rows", type=int, default=64, help="rows per GPU per rollout phase")
    parser.add_argument("--max-rows", type=int, default=None, help="RolloutBudget.max_rows (default: what fits)")
    parser.add_argument("--memory-gb", type=float, default=None, help="RolloutBudget.memory_gb")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="RolloutBudget.prefill_chunk")
    parser.add_argument("--no-gather-for-generation", action="store_true",
                        help="rollout with ds3_gather_for_generation false (weights gathered per layer)")
    parser.add_argument("--distill-batch", type=int, default=8)
    parser.add_argument("--distill-seq-len", type=int, default=8192)
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="per GPU: CUDA context, NCCL, fragmentation")
    parser.add_argument("--min-rollout-rows", type=int, default=None,
                        help="slots a rollout needs to count as fitting (default G)")
    parser.add_argument("--json", default=None, help="--measure: also write everything to this JSON file")
    parser.add_argument("--reference-model", action="store_true", help="arithmetic: GRPO with beta > 0")
    args = parser.parse_args(argv)
    layout = args.layout.split(",") if args.layout else None
    shape = Shape(m2_layers=args.m2_layers, layout=layout, layers=len(layout) if layout else Shape.layers)
    if not args.measure:
        rows = estimate(shape, args.gpus or 16, args.micro_batch, args.seq_len, args.rollout_rows,
                        args.reference_model)
        print("| what | arithmetic | GiB |\n|---|---|---|")
        for what, arithmetic, gib in rows:
            print(f"| {what} | {arithmetic} | {gib:.2f} |" if gib else f"| {what} | {arithmetic} | |")
        return 0
    settings = Settings(
        seq_lens=args.seq_lens, prompt_len=args.prompt_len, micro_batch=args.micro_batch, generations=args.generations,
        rollout_rows=args.rollout_rows, max_rows=args.max_rows, memory_gb=args.memory_gb,
        prefill_chunk=args.prefill_chunk, gather_for_generation=not args.no_gather_for_generation,
        distill_batch=args.distill_batch, distill_seq_len=args.distill_seq_len, gpus=args.gpus,
        reserve_gib=args.reserve_gib, min_rollout_rows=args.min_rollout_rows)
    result = measure(shape, settings)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
