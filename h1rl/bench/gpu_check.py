"""GPU check of the rollout path: kernels vs torch, static/graph decode vs eager, log-probs vs recompute, speed.

One short run on one CUDA GPU (a few minutes), printing tables and writing every figure to a JSON file:

a. which optional kernels import (mamba-ssm's selective_scan_fn / selective_state_update, causal-conv1d);
b. the selective scan's "cuda" / "torch" / "ref" paths on one small shape, and the m2 mixer with kernels vs with
   them switched off (the pure-torch path), for the parallel forward and the decode step, float32 and bfloat16;
c. `RolloutEngine` with decode "eager", "static" and "cuda_graph" in greedy mode: identical tokens (float32; the
   bfloat16 match rate is reported, not asserted: near-ties may flip);
d. rollout log-probs vs a full-forward recomputation as the trainer does it (one left-padded batch), in float32
   and bfloat16, for the eager and the graph decode. A random model is near-uniform, which hides disagreement, so
   its LM head is scaled until the mean entropy of the sampled positions is a few nats (reported);
e. tokens/s: engine (eager, cuda_graph) vs `model.generate` on a hybrid of hidden 1024, 16 layers (half m2),
   4 prompts x G=8, 512 new tokens; then the hybrid (engine) vs its teacher (`MistralForCausalLM.generate`, static
   cache, eager unless `--teacher-compile`) at `--lengths`. Later rows are skipped once `--budget-s` is spent;
f. one GRPO step's wall time, `HybridGRPOTrainer` (engine) vs stock `trl.GRPOTrainer` (`model.generate`) on the
   same hybrid (hidden `--hidden`, `--layers`, half m2, float32) and `GRPOConfig`: `--batch` prompts x G,
   256 new tokens (`h1rl bench grpo` on the GPU; issue #5's 2.5x target); then the hybrid trainer again with
   `share_prompt_prefix` forced on and off (is sharing worth its masked continuation on a GPU?) and with
   `length_chunks=1` (what grouping rows by length brings on a GPU);
g. fused attention kernels: every attention path of a training and rollout step in bf16 (training forward and
   backward with left padding, the shared-prefix training forward, a chunked prefill of prompts of mixed lengths
   under a tight rollout budget, the eager / static / CUDA-graph decode over partly filled KV buffers, `generate`
   with left padding) run under `sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`, where a call that would fall
   back to the math kernel raises; every call is also recorded and checked against PyTorch's rules
   (`h1rl.bench.attention_calls`), which is all the CPU smoke can do;
h. synced decoding: 2 processes on the one device (gloo for the engine's one flag per call), rank 0's rows stopping
   at their first token and rank 1's running to the cap, under a tight budget and a chunked prefill: both finish and
   each equals its own unsynced rollout (ZeRO-3 itself is in tests/zero, on CPU);
i. the RL-level comparison (`h1rl bench grpo --against-teacher` on the GPU): one GRPO step of the hybrid under
   `HybridGRPOTrainer` and of its teacher under stock `trl.GRPOTrainer` (hidden 512, 8 layers, 8/2 heads, vocab 32k,
   4 prompts x G=8, prompts of 128 tokens) at completion caps `--grpo-caps` with RL's spread of lengths, stock TRL
   on the hybrid at the smallest cap, then the hybrid at the largest cap with partial rollouts off, off with only the
   importance-sampling correction, and on (budget cap / 4). Runs last: the longest section.

Each section runs on its own: an error is printed with its traceback, recorded in the JSON, and the next section
runs. Without mamba-ssm / causal-conv1d the torch paths still run on the GPU, and the output says so.

Run (GPU):        python -m h1rl.bench.gpu_check --json gpu_check.json
Run (CPU smoke):  python -m h1rl.bench.gpu_check --cpu-smoke --json /tmp/gpu_check_smoke.json
  (tiny sizes on CPU: every code path except the CUDA-specific ones, which report "skipped".)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import h1rl.models.mamba as mamba_mod
import h1rl.models.scan as scan_mod
from h1rl.bench.rollout_bench import build_pair, teacher_cache_bytes_per_sequence
from h1rl.models.configuration import HybridConfig
from h1rl.models.mamba import MambaMixer
from h1rl.rollout import RolloutEngine, SamplingParams

# ----------------------------------------------------------------------------------------------------------
# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows of dicts as a fixed-width table (floats in %.3g, or %.1f when >= 100)."""
    print(f"\n{title}")
    if not rows:
        print("  (no rows)")
        return
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))


@contextlib.contextmanager
def kernels_disabled():
    """Switch h1rl's optional CUDA kernels off (the pure-torch path runs on the GPU), restoring them after."""
    saved = (mamba_mod.causal_conv1d_fn, mamba_mod.causal_conv1d_update, scan_mod._mamba_scan_fn,
             scan_mod._mamba_state_update)
    mamba_mod.causal_conv1d_fn = mamba_mod.causal_conv1d_update = None
    scan_mod._mamba_scan_fn = scan_mod._mamba_state_update = None
    try:
        yield
    finally:
        (mamba_mod.causal_conv1d_fn, mamba_mod.causal_conv1d_update, scan_mod._mamba_scan_fn,
         scan_mod._mamba_state_update) = saved


def kernels_active() -> bool:
    return scan_mod._mamba_state_update is not None or mamba_mod.causal_conv1d_update is not None


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------------------------
# a. kernels


def check_kernels(device: torch.device) -> dict:
    out: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda_runtime": torch.version.cuda,
    }
    rows = []
    for module, names in (
        ("mamba_ssm.ops.selective_scan_interface", ["selective_scan_fn"]),
        ("mamba_ssm.ops.triton.selective_state_update", ["selective_state_update"]),
        ("causal_conv1d", ["causal_conv1d_fn", "causal_conv1d_update"]),
    ):
        for name in names:
            try:
                getattr(importlib.import_module(module), name)
                status = "importable"
            except Exception as err:  # ImportError, or a broken CUDA extension
                status = f"missing ({type(err).__name__}: {str(err)[:80]})"
            rows.append({"kernel": f"{module}.{name}", "status": status})
    for pkg in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            out[f"{pkg}_version"] = importlib.import_module(pkg).__version__
        except Exception:
            out[f"{pkg}_version"] = None
    out["kernels"] = rows
    out["h1rl_uses"] = {
        "scan_cuda (selective_scan_fn)": scan_mod._mamba_scan_fn is not None,
        "state_update (selective_state_update)": scan_mod._mamba_state_update is not None,
        "causal_conv1d_fn": mamba_mod.causal_conv1d_fn is not None,
        "causal_conv1d_update": mamba_mod.causal_conv1d_update is not None,
    }
    print_table("a. optional kernels", rows)
    print(f"  h1rl will use: {out['h1rl_uses']}")
    if device.type == "cuda" and not kernels_active():
        print("  NOTE: mamba-ssm / causal-conv1d not installed: the GPU runs h1rl's pure-torch paths below")
    return out


# ----------------------------------------------------------------------------------------------------------
# b. scan and mixer: kernel vs torch


def check_scan(device: torch.device, smoke: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    Bsz, T, H, P, N = (2, 16, 2, 4, 4) if smoke else (2, 256, 8, 16, 16)
    x = torch.randn(Bsz, T, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(Bsz, T, H, P, generator=g) - 2)
    A = -torch.exp(torch.randn(H, P, N, generator=g) * 0.5)
    Bm, Cm = torch.randn(Bsz, T, H, N, generator=g), torch.randn(Bsz, T, H, N, generator=g)
    args = [t.to(device) for t in (x, dt, A, Bm, Cm)]
    y_ref, s_ref = scan_mod.selective_scan(*args, return_final_state=True, impl="ref")
    rows = []
    for impl in ("torch", "cuda"):
        if impl == "cuda" and (scan_mod._mamba_scan_fn is None or device.type != "cuda"):
            rows.append({"impl": impl, "y_vs_ref": "skipped", "state_vs_ref": "skipped",
                         "note": "mamba-ssm not importable" if device.type == "cuda" else "no CUDA"})
            continue
        y, s = scan_mod.selective_scan(*args, return_final_state=True, impl=impl)
        rows.append({"impl": impl, "y_vs_ref": max_diff(y, y_ref), "state_vs_ref": max_diff(s, s_ref), "note": ""})
    print_table(f"b1. selective scan vs 'ref' (float32, B={Bsz} T={T} H={H} P={P} N={N}): max abs diff", rows)
    return {"shape": dict(B=Bsz, T=T, H=H, P=P, N=N), "rows": rows}


def small_config(smoke: bool) -> HybridConfig:
    D, heads, kv = (64, 4, 2) if smoke else (512, 16, 4)
    return HybridConfig(
        vocab_size=97, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1, hybrid_block_layout=["m2"],
        num_attention_heads=heads, num_key_value_heads=kv,
        ssm_cfg={"d_inner": D, "d_xb": D * kv // heads, "d_state": 16 if not smoke else 8, "dt_rank": D // 16},
    )


@torch.no_grad()
def mixer_paths(mixer: MambaMixer, h: torch.Tensor, T0: int) -> tuple[torch.Tensor, ...]:
    """h (B, T, D) -> the parallel forward (B, T, D), the outputs of decode steps T0..T-1 after a prefill of T0
    tokens (B, T - T0, D), and the final SSM state."""
    Bsz, T, _ = h.shape
    full = mixer(h)  # parallel path, no state
    state = mixer.allocate_inference_cache(Bsz, T)
    mixer(h[:, :T0], state=state)
    steps = torch.stack([mixer.step(h[:, t], state=state) for t in range(T0, T)], 1)
    return full, steps, state.ssm.clone()


def check_mixer(device: torch.device, smoke: bool) -> dict:
    """m2 mixer with kernels vs the torch path: forward over T tokens, and T0 prefill + (T - T0) decode steps."""
    torch.manual_seed(0)
    Bsz, T, T0 = (2, 8, 4) if smoke else (4, 64, 32)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        mixer = MambaMixer(small_config(smoke), 0).to(device=device, dtype=dtype).eval()
        with torch.no_grad():
            mixer.dt_proj.bias.uniform_(-3.0, 0.5)  # non-trivial decay, so that the state matters
        h = torch.randn(Bsz, T, mixer.hidden_size, device=device, dtype=dtype)
        full_k, steps_k, ssm_k = mixer_paths(mixer, h, T0)
        with kernels_disabled():
            full_t, steps_t, ssm_t = mixer_paths(mixer, h, T0)
        rows.append({
            "dtype": str(dtype).removeprefix("torch."),
            "kernels": kernels_active() and device.type == "cuda",
            "forward_kernel_vs_torch": max_diff(full_k, full_t),
            "step_kernel_vs_torch": max_diff(steps_k, steps_t),
            "ssm_state_kernel_vs_torch": max_diff(ssm_k, ssm_t),
            "step_vs_forward(kernel path)": max_diff(steps_k, full_k[:, T0:]),
            "output_scale": full_t.float().abs().max().item(),
        })
    print_table(f"b2. m2 mixer, kernels vs pure torch (B={Bsz}, T={T}, decode from {T0}): max abs diff", rows)
    if not (kernels_active() and device.type == "cuda"):
        print("  (no kernels in use: both sides ran the torch path; step_vs_forward is the meaningful column)")
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------------------
# c. engine decode modes


def decode_modes(device: torch.device) -> list[str]:
    return ["eager", "static"] + (["cuda_graph"] if device.type == "cuda" else [])


def check_engine_modes(device: torch.device, smoke: bool) -> dict:
    hidden, layers, vocab, new = (64, 4, 97, 12) if smoke else (256, 6, 512, 96)
    _, hybrid = build_pair(hidden, layers, vocab, seed=1)
    prompts = random_prompts([5, 17, 2, 9] if not smoke else [3, 6], vocab, seed=1)
    G = 4 if not smoke else 2
    stops = list(range(1, vocab, 23))  # rows stop at different steps: exercises compaction and smaller graph buckets
    rows, result = [], {"modes": decode_modes(device)}
    if device.type != "cuda":
        result["cuda_graph"] = "skipped: no CUDA"
    for dtype in (torch.float32, torch.bfloat16):
        model = hybrid.to(device=device, dtype=dtype)
        params = SamplingParams(max_new_tokens=new, temperature=0, stop_token_ids=stops)
        outs = {m: RolloutEngine(model, 0, decode=m).generate(prompts, G, params) for m in decode_modes(device)}
        ref = outs["eager"]
        for mode, out in outs.items():
            L = min(ref.completion_ids.shape[1], out.completion_ids.shape[1])
            same = torch.equal(out.completion_ids, ref.completion_ids)
            match = (out.completion_ids[:, :L] == ref.completion_ids[:, :L]).float().mean().item()
            lp = max_diff(out.logprobs[:, :L], ref.logprobs[:, :L]) if same else float("nan")
            rows.append({"dtype": str(dtype).removeprefix("torch."), "decode": mode, "tokens_identical": same,
                         "token_match": match, "logprob_diff_vs_eager": lp, "stopped_rows":
                         out.finish_reasons.count("stop"), "capture_s": out.stats["graph_capture_s"]})
    result["rows"] = rows
    print_table(f"c. engine decode modes, greedy, {len(prompts)} prompts x G={G}, {new} new tokens "
                f"(float32 must be identical)", rows)
    f32 = [r for r in rows if r["dtype"] == "float32"]
    result["float32_all_identical"] = all(r["tokens_identical"] for r in f32)
    print(f"  float32 tokens identical across modes: {result['float32_all_identical']}")
    return result


# ----------------------------------------------------------------------------------------------------------
# d. rollout log-probs vs full-forward recomputation


def recompute_logprobs(model, rollout, temperature: float) -> tuple[list[torch.Tensor], float]:
    """The trainer's recomputation: one left-padded batch (prompt) + right-padded completions, one forward.
    Returns per-row log-probs and the mean entropy (nats) of the completion positions."""
    comps = rollout.completions()
    ids, mask, Tp = rollout.training_batch()
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, Tp - 1 : -1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(2, ids[:, Tp:, None])[..., 0].cpu()
    valid = mask[:, Tp:].bool()
    entropy = -(logp.exp() * logp).sum(-1)[valid].mean().item()
    return [lp[r, : len(c)] for r, c in enumerate(comps)], entropy


def sharpen(model, prompts: list[list[int]], target_entropy: float = 3.0) -> float:
    """Scale the LM head so the next-token entropy on the prompts is about `target_entropy` nats; returns the
    factor (a random model's near-uniform distributions would hide any disagreement)."""
    k = min(map(len, prompts))
    ids = torch.tensor([p[-k:] for p in prompts], device=model.device)
    factor = 1.0
    for _ in range(30):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float(), -1)
        entropy = -(logp.exp() * logp).sum(-1).mean().item()
        if entropy <= target_entropy:
            break
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        factor *= 1.5
    return factor


def check_logprobs(device: torch.device, smoke: bool) -> dict:
    hidden, layers, vocab, new = (64, 4, 97, 16) if smoke else (512, 8, 4096, 128)
    _, hybrid = build_pair(hidden, layers, vocab, seed=2)
    prompts = random_prompts([7, 30, 3, 15] if not smoke else [3, 6], vocab, seed=2)
    G = 4 if not smoke else 2
    hybrid = hybrid.to(device)
    factor = sharpen(hybrid, prompts)
    modes = ["eager", "cuda_graph" if device.type == "cuda" else "static"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = hybrid.to(dtype=dtype)
        params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
        for mode in modes:
            out = RolloutEngine(model, 0, decode=mode).generate(prompts, G, params)
            recomputed, entropy = recompute_logprobs(model, out, 1.0)
            diffs = torch.cat([out.logprobs[r, : len(x)] - x for r, x in enumerate(recomputed)]).abs()
            rows.append({"dtype": str(dtype).removeprefix("torch."), "decode": mode, "max_abs": diffs.max().item(),
                         "mean_abs": diffs.mean().item(), "p99_abs": diffs.quantile(0.99).item(),
                         "tokens": diffs.numel(), "mean_entropy_nats": entropy})
    print_table(f"d. rollout log-probs vs full-forward recompute (left-padded batch), hybrid hidden {hidden}, "
                f"{layers} layers, LM head x{factor:.3g}", rows)
    for r in rows:
        if r["dtype"] == "bfloat16":
            print(f"  bf16 rollout-vs-recompute ({r['decode']}): max {r['max_abs']:.3g}, mean {r['mean_abs']:.3g}")
    return {"lm_head_scale": factor, "rows": rows, "kernels": kernels_active() and device.type == "cuda"}


# ----------------------------------------------------------------------------------------------------------
# e. timing


def time_call(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def engine_tok_s(model, prompts, G, new, mode, device) -> tuple[float, dict]:
    engine = RolloutEngine(model, 0, decode=mode)
    params = SamplingParams(max_new_tokens=new, seed=0)
    seconds, out = time_call(lambda: engine.generate(prompts, G, params), device)
    assert int(out.lengths.min()) == new, "no stop tokens: every row must run to the cap"
    return out.lengths.sum().item() / seconds, out.stats


def generate_tok_s(model, prompts, G, new, device, static: bool, compile_teacher: bool = False) -> float:
    ids = torch.tensor(prompts, device=device).repeat_interleave(G, dim=0)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, pad_token_id=0)
    if static:
        kwargs.update(cache_implementation="static", disable_compile=not compile_teacher)

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    seconds, out = time_call(run, device)
    assert out.shape[1] == ids.shape[1] + new
    return ids.shape[0] * new / seconds


def check_timing(device: torch.device, args: argparse.Namespace, started: float) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, hybrid = build_pair(args.hidden, args.layers, args.vocab)
    teacher, hybrid = teacher.to(device=device, dtype=dtype), hybrid.to(device=device, dtype=dtype)
    prompts = random_prompts([args.prompt_len] * args.batch, args.vocab, seed=3)
    G, N = args.generations, args.new_tokens
    graph = "cuda_graph" if device.type == "cuda" else None
    settings = dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab, dtype=str(dtype), batch=args.batch,
                    generations=G, prompt_len=args.prompt_len, new_tokens=N, layout=hybrid.config.hybrid_block_layout,
                    kernels=kernels_active() and device.type == "cuda", teacher_compile=args.teacher_compile)
    print(f"\ne. timing: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {dtype}, "
          f"{args.batch} prompts x G={G}, prompt {args.prompt_len} tokens")
    warm = max(4, N // 32)  # warm-up: cuBLAS, Triton JIT, allocator
    for mode in ["eager"] + ([graph] if graph else []):
        engine_tok_s(hybrid, prompts, G, warm, mode, device)
    generate_tok_s(hybrid, prompts, G, warm, device, static=False)
    generate_tok_s(teacher, prompts, G, warm, device, static=True, compile_teacher=args.teacher_compile)

    rows = []
    for name, fn in (
        ("engine eager", lambda: engine_tok_s(hybrid, prompts, G, N, "eager", device)),
        ("engine cuda_graph", (lambda: engine_tok_s(hybrid, prompts, G, N, graph, device)) if graph else None),
        ("model.generate", lambda: (generate_tok_s(hybrid, prompts, G, N, device, static=False), {})),
    ):
        if fn is None:
            rows.append({"hybrid": name, "tok_s": float("nan"), "note": "skipped: no CUDA"})
            continue
        tps, stats = fn()
        rows.append({"hybrid": name, "tok_s": tps, "note": f"capture {stats['graph_capture_s']:.2f}s"
                     if stats.get("graph_capture_s") else ""})
    base = next(r["tok_s"] for r in rows if r["hybrid"] == "model.generate")
    for r in rows:
        r["vs_generate"] = r["tok_s"] / base
    print_table(f"e1. same hybrid, {N} new tokens: tokens/s (all rows)", rows, ["hybrid", "tok_s", "vs_generate",
                                                                                "note"])

    best = graph or "eager"
    teacher_rows = []
    for L in args.lengths:
        if time.perf_counter() - started > args.budget_s:
            teacher_rows.append({"new_tokens": L, "note": f"skipped: time budget {args.budget_s}s spent"})
            continue
        h_tps, h_stats = engine_tok_s(hybrid, prompts, G, L, best, device)
        t_tps = generate_tok_s(teacher, prompts, G, L, device, static=True, compile_teacher=args.teacher_compile)
        teacher_rows.append({"new_tokens": L, f"hybrid_{best}_tok_s": h_tps, "teacher_tok_s": t_tps,
                             "speedup": h_tps / t_tps, "hybrid_state_MiB_per_seq":
                             h_stats["state_bytes_per_seq"] / 2**20, "teacher_state_MiB_per_seq":
                             teacher_cache_bytes_per_sequence(teacher, args.prompt_len + L - 1) / 2**20, "note": ""})
    teacher_label = "compiled" if args.teacher_compile else "eager"
    print_table(f"e2. hybrid (engine, {best}) vs teacher (generate, static cache, {teacher_label})", teacher_rows)
    return {"settings": settings, "hybrid": rows, "hybrid_vs_teacher": teacher_rows}


# ----------------------------------------------------------------------------------------------------------
# g. fused attention kernels


def attention_paths(device: torch.device, smoke: bool) -> dict[str, Callable[[], object]]:
    """The attention paths of a training and a rollout step, on a bf16 hybrid with grouped-query heads."""
    from h1rl.rollout import RolloutBudget

    hidden, layers, vocab = (64, 4, 97) if smoke else (512, 8, 4096)
    _, hybrid = build_pair(hidden, layers, vocab, seed=4)
    model = hybrid.to(device=device, dtype=torch.bfloat16)
    lengths = [5, 2, 9, 3] if smoke else [60, 17, 130, 33]
    prompts = random_prompts(lengths, vocab, seed=4)
    ids = torch.zeros(len(lengths), max(lengths) + 8, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # TRL's layout: left-padded prompt, right-padded completion
        start = max(lengths) - len(p)
        ids[r, start : max(lengths) + 8 - r] = torch.randint(1, vocab, (len(p) + 8 - r,), device=device)
        mask[r, start : max(lengths) + 8 - r] = 1
    params = SamplingParams(max_new_tokens=6 if smoke else 24, temperature=1.0, stop_token_ids=[1, 2, 3], seed=0)
    budget = RolloutBudget(max_rows=3, prefill_chunk=4 if smoke else 48)

    def train(share: bool = False) -> None:
        model.train()
        ctx = model.model.sharing_prefix(max(lengths)) if share else contextlib.nullcontext()
        with ctx:
            model(ids, attention_mask=mask, use_cache=False).logits.float().mean().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    def rollout(mode: str):
        return lambda: RolloutEngine(model, 0, decode=mode, budget=budget).generate(prompts, 2, params)

    paths = {"training forward+backward, left padding": train,
             "shared-prefix training forward": lambda: train(share=True)}
    for mode in decode_modes(device):
        paths[f"rollout: chunked prefill + {mode} decode"] = rollout(mode)
    paths["generate, left padding"] = lambda: model.generate(
        ids[:, : max(lengths)], attention_mask=mask[:, : max(lengths)], max_new_tokens=4, do_sample=False,
        pad_token_id=0)
    return paths


def check_fused_attention(device: torch.device, smoke: bool) -> dict:
    from h1rl.bench.attention_calls import fused_kernels, record_attention_calls

    rows = []
    for name, run in attention_paths(device, smoke).items():
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            restricted = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
        else:
            restricted = contextlib.nullcontext()
        error = ""
        with record_attention_calls() as calls, restricted:
            try:
                with torch.no_grad() if "training" not in name else contextlib.nullcontext():
                    run()
            except RuntimeError as err:  # "No available kernel": a math fallback under the restriction
                error = f"{type(err).__name__}: {str(err)[:120]}"
        kernels = [fused_kernels(c) for c in calls]
        rows.append({"path": name, "calls": len(calls), "flash": sum("flash" in k for k in kernels),
                     "efficient_only": sum(k == {"efficient"} for k in kernels),
                     "rules_refuse": sum(not k for k in kernels),
                     "ran_fused_only": "skipped: no CUDA" if device.type != "cuda" else not error, "error": error})
    print_table("g. attention calls per path (bf16): fused-kernel eligibility by PyTorch's rules, and on CUDA a run "
                "with the math kernel disabled", rows)
    ok = all(r["rules_refuse"] == 0 and not r["error"] for r in rows)
    print(f"  every call fused: {ok}")
    return {"rows": rows, "all_fused": ok}


# ----------------------------------------------------------------------------------------------------------
# h. synced decoding


def _synced_rank(rank: int, port: int, device_type: str, smoke: bool, out: str) -> None:
    import os

    from h1rl.rollout import RolloutBudget

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    device = torch.device(device_type)
    hidden, layers, vocab = (64, 4, 97) if smoke else (512, 8, 4096)
    _, hybrid = build_pair(hidden, layers, vocab, seed=5)
    model = hybrid.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    lengths = ([7, 2] if rank == 0 else [3, 11]) if smoke else ([70, 20] if rank == 0 else [30, 110])
    prompts = random_prompts(lengths, vocab, seed=10 + rank)
    stops = list(range(vocab)) if rank == 0 else []  # rank 0: every row stops at its first token
    params = SamplingParams(max_new_tokens=6 if smoke else 64, temperature=1.0, stop_token_ids=stops, seed=rank)
    budget = RolloutBudget(max_rows=3, prefill_chunk=4 if smoke else 32)
    start = time.perf_counter()
    synced = RolloutEngine(model, 0, budget=budget, synced=True).generate(prompts, 2, params)
    seconds = time.perf_counter() - start
    torch.distributed.barrier()
    alone = RolloutEngine(model, 0, budget=budget, synced=False).generate(prompts, 2, params)
    result = {"rank": rank, "seconds": seconds, "lengths": synced.lengths.tolist(),
              "equals_unsynced": synced.completions() == alone.completions()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def check_synced_decode(device: torch.device, smoke: bool) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_synced_rank, args=(port, device.type, smoke, out), nprocs=2, join=True,
                           start_method="spawn")
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    print_table("h. synced decoding, 2 processes, rank 0 stops at the first token, rank 1 runs to the cap", rows)
    ok = all(r["equals_unsynced"] for r in rows) and max(rows[0]["lengths"]) == 1
    print(f"  both finished, each equal to its unsynced rollout: {ok}")
    return {"rows": rows, "ok": ok}


# ----------------------------------------------------------------------------------------------------------
# main


def check_grpo_step(device: torch.device, args: argparse.Namespace) -> dict:
    from h1rl.bench.grpo_bench import run_grpo_benchmark

    print(f"\nf. GRPO step: HybridGRPOTrainer vs trl.GRPOTrainer on {device.type}")
    steps = 1 if args.cpu_smoke else 2
    # the defaults, and the two training-pass savings toggled
    variants = {"share_prompt_prefix on": {"share_prompt_prefix": True},
                "share_prompt_prefix off": {"share_prompt_prefix": False}, "length_chunks 1": {"length_chunks": 1}}
    return run_grpo_benchmark(new_tokens=args.grpo_new_tokens, generations=args.generations, prompts=args.batch,
                              steps=steps, hidden=args.hidden, layers=args.layers, device=device.type,
                              variants=variants)


def check_against_teacher(device: torch.device, args: argparse.Namespace) -> dict:
    from h1rl.bench.grpo_bench import run_against_teacher, run_partial_rollouts_benchmark

    print(f"\ni. GRPO step: the hybrid (HybridGRPOTrainer) vs its teacher (trl.GRPOTrainer) on {device.type}")
    shape = (dict(hidden=64, layers=4, heads=4, kv_heads=2, vocab=97, prompt_len=5, prompts=2, generations=2)
             if args.cpu_smoke else {})
    out = str(Path(args.json).with_suffix("")) + "_grpo"
    result = run_against_teacher(caps=tuple(args.grpo_caps), device=device.type, out_dir=out, warmup_cap=8, **shape)
    result["partial_rollouts"] = run_partial_rollouts_benchmark(cap=max(args.grpo_caps), steps=3, device=device.type,
                                                                out_dir=out, **shape)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m h1rl.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="gpu_check.json", help="where to write all figures")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: runs every non-CUDA code path")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="e2: generated lengths")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16, help="teacher layers; the hybrid turns every other into m2")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4, help="distinct prompts")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=512, help="e1: generated tokens")
    p.add_argument("--teacher-compile", action="store_true", help="let generate torch.compile the teacher")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip e2 rows that start after this many seconds")
    p.add_argument("--skip", nargs="*", default=[], choices=list("abcdefghi"), help="sections to skip")
    p.add_argument("--grpo-new-tokens", type=int, default=256, help="f: max completion length of the GRPO step")
    p.add_argument("--grpo-caps", type=int, nargs="+", default=[1024, 2048, 4096], help="i: completion caps")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.hidden, args.layers, args.vocab, args.batch, args.generations = 64, 4, 97, 2, 2
        args.prompt_len, args.new_tokens, args.lengths, args.grpo_new_tokens = 5, 8, [8, 16], 8
        args.grpo_caps = [16, 32]
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to exercise the code paths on CPU")
        return 2
    else:
        device = torch.device("cuda")
    started = time.perf_counter()
    results: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "args": vars(args)}
    sections = {
        "a_kernels": ("a", lambda: check_kernels(device)),
        "b_scan": ("b", lambda: check_scan(device, args.cpu_smoke)),
        "b_mixer": ("b", lambda: check_mixer(device, args.cpu_smoke)),
        "c_engine_modes": ("c", lambda: check_engine_modes(device, args.cpu_smoke)),
        "d_logprobs": ("d", lambda: check_logprobs(device, args.cpu_smoke)),
        "e_timing": ("e", lambda: check_timing(device, args, started)),
        "f_grpo_step": ("f", lambda: check_grpo_step(device, args)),
        "g_fused_attention": ("g", lambda: check_fused_attention(device, args.cpu_smoke)),
        "h_synced_decode": ("h", lambda: check_synced_decode(device, args.cpu_smoke)),
        "i_against_teacher": ("i", lambda: check_against_teacher(device, args)),
    }
    failed = []
    for key, (letter, fn) in sections.items():
        if letter in args.skip:
            results[key] = {"skipped": "--skip"}
            continue
        t0 = time.perf_counter()
        try:
            results[key] = fn()
        except Exception as err:  # keep going: one GPU session, every figure counts
            traceback.print_exc()
            results[key] = {"error": f"{type(err).__name__}: {err}"}
            failed.append(key)
        results[key]["seconds"] = time.perf_counter() - t0
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))  # partial results survive a timeout
    results["total_seconds"] = time.perf_counter() - started
    results["failed_sections"] = failed
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"\ntotal {results['total_seconds']:.1f}s; failed sections: {failed or 'none'}; wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
