"""`h1rl bench rollout`: rollout speed and decode memory, measured side by side in one run.

First what one decode step costs by active rows (the floor under what dropping finished rows can save), then
three comparisons, sampling at temperature 1:
1. engine vs `generate` on the same hybrid (half its layers m2): B prompts x G generations, up to N new tokens,
   (a) with no stop tokens, every row generating all N tokens, and (b) with a few stop tokens, so that completion
   lengths spread as in RL (a random model stops after ~`vocab / stops` tokens on average); `generate` keeps
   computing finished rows until the last one stops, the engine drops them;
2. hybrid (engine, no stop tokens) vs its teacher transformer (`MistralForCausalLM.generate`, static cache), the
   hybrid being the teacher converted with every other layer m2, at several generated lengths;
3. decode-state memory per sequence after N tokens, hybrid / teacher (bytes held by the cache, not the allocator).
Models are random-weight, sized by `--hidden` and `--layers`; speed depends on sizes and on the machine, so the
figures that matter are the ratios. Writes a JSON file and a PNG plot (tokens/s against generated length).

Run: `h1rl bench rollout [--lengths 1024 2048 4096] [--out bench-rollout]`
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

from h1rl.models.convert import convert_teacher
from h1rl.rollout import RolloutEngine, SamplingParams


def build_pair(hidden: int, layers: int, vocab: int, seed: int = 0):
    """A random Mistral teacher and its hybrid with layers 1, 3, 5, ... turned into m2 (Mamba-in-Llama)."""
    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=16384,
        sliding_window=None, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    teacher = MistralForCausalLM(cfg).eval()
    layout = ["m2" if i % 2 else "t" for i in range(layers)]
    hybrid = convert_teacher(teacher, layout, ssm_cfg={"d_state": 16}, seed=seed).eval()
    return teacher, hybrid


def _prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    return torch.randint(1, vocab, (batch, prompt_len)).tolist()


def time_engine(model, prompts, G: int, new_tokens: int, stops: list[int] = ()) -> tuple[float, object]:
    """Useful tokens per second (tokens up to and including each row's stop token)."""
    engine = RolloutEngine(model, pad_token_id=0)
    start = time.perf_counter()
    out = engine.generate(prompts, G, SamplingParams(max_new_tokens=new_tokens, stop_token_ids=list(stops), seed=0))
    elapsed = time.perf_counter() - start
    if not stops:
        assert int(out.lengths.min()) == new_tokens
    return out.lengths.sum().item() / elapsed, out


def time_generate(model, prompts, G: int, new_tokens: int, static: bool, stops: list[int] = ()) -> float:
    """Useful tokens per second of `generate` (padding after a row's stop token not counted)."""
    ids = torch.tensor(prompts).repeat_interleave(G, dim=0)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=True, pad_token_id=0)
    if stops:
        kwargs["eos_token_id"] = list(stops)
    else:
        kwargs["min_new_tokens"] = new_tokens
    if static:
        kwargs["cache_implementation"] = "static"
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    elapsed = time.perf_counter() - start
    completion = out[:, ids.shape[1] :]
    if not stops:
        assert completion.shape[1] == new_tokens
        return completion.numel() / elapsed
    is_stop = torch.isin(completion, torch.tensor(list(stops)))
    first = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, completion.shape[1])
    return first.sum().item() / elapsed


def teacher_cache_bytes_per_sequence(teacher, seq_len: int) -> int:
    """KV bytes one sequence of seq_len tokens holds in the teacher (keys + values, every layer)."""
    cfg = teacher.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * teacher.dtype.itemsize
    return per_token * seq_len


def decode_step_ms(model, rows: int, context: int = 64, steps: int = 30) -> float:
    """Milliseconds of one eager decode step (the model's forward with a cache) for `rows` rows after a `context`-token
    prefill: median of `steps` steps after 3 warm-up steps."""
    vocab = model.config.vocab_size
    cache = model.allocate_cache(rows, context + steps + 4)
    times = []
    with torch.no_grad():
        model(torch.randint(1, vocab, (rows, context)), cache=cache, use_cache=True, logits_to_keep=1)
        tokens = torch.randint(1, vocab, (rows, 1))
        for i in range(steps + 3):
            start = time.perf_counter()
            model(tokens, position_ids=torch.full((rows, 1), context + i), cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times[3:])[steps // 2]


def run_rollout_benchmark(
    lengths: list[int] = (1024, 2048, 4096), hidden: int = 256, layers: int = 8, vocab: int = 512,
    batch: int = 4, generations: int = 8, prompt_len: int = 64, engine_vs_generate_tokens: int = 512,
    out_dir: str = "bench-rollout",
) -> dict:
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    teacher, hybrid = build_pair(hidden, layers, vocab)
    prompts = _prompts(batch, prompt_len, vocab)
    results: dict = {"settings": dict(hidden=hidden, layers=layers, vocab=vocab, batch=batch, generations=generations,
                                      prompt_len=prompt_len, torch_threads=torch.get_num_threads())}
    N = engine_vs_generate_tokens
    print(f"hidden {hidden}, {layers} layers (hybrid: {hybrid.config.hybrid_block_layout}), "
          f"{batch} prompts x G={generations}, prompt {prompt_len} tokens, torch threads {torch.get_num_threads()}")

    # 0. what one decode step costs by active rows: the floor under the engine's savings on finished rows
    R = batch * generations
    counts = sorted({1, max(1, R // 8), R})
    results["decode_step_ms"] = {n: decode_step_ms(hybrid, n) for n in counts}
    print("\n0. one decode step of the hybrid (eager), by active rows: "
          + ", ".join(f"{n} rows {ms:.1f} ms" for n, ms in results["decode_step_ms"].items()))

    # 1. engine vs generate on the same hybrid, fixed and spread lengths
    stops = list(range(1, 1 + max(1, vocab // 128)))  # ~1/128 stop chance a token: mean length ~128
    results["engine_vs_generate"] = []
    print(f"\n1. same hybrid, up to {N} new tokens")
    for label, stop_ids in (("no stop tokens", []), (f"{len(stops)} stop tokens", stops)):
        eng_tps, eng_out = time_engine(hybrid, prompts, generations, N, stop_ids)
        gen_tps = time_generate(hybrid, prompts, generations, N, static=False, stops=stop_ids)
        mean_len = eng_out.lengths.float().mean().item()
        results["engine_vs_generate"].append(dict(case=label, new_tokens=N, mean_completion=mean_len,
                                                  engine_tok_s=eng_tps, generate_tok_s=gen_tps,
                                                  speedup=eng_tps / gen_tps))
        print(f"   {label:>16} (mean completion {mean_len:5.0f}):  engine {eng_tps:8.0f} tok/s   "
              f"generate {gen_tps:8.0f} tok/s   -> {eng_tps / gen_tps:.2f}x")

    # 2./3. hybrid (engine) vs teacher (generate, static cache) at several lengths
    rows = []
    print("\n2. hybrid (engine) vs teacher transformer (generate, static cache)")
    print(f"{'tokens':>8} {'hybrid tok/s':>13} {'teacher tok/s':>14} {'speedup':>8} {'state/seq hybrid':>17} "
          f"{'teacher':>10} {'ratio':>6}")
    for L in lengths:
        h_tps, h_out = time_engine(hybrid, prompts, generations, L)
        t_tps = time_generate(teacher, prompts, generations, L, static=True)
        h_bytes = h_out.stats["state_bytes_per_seq"]  # measured on the engine's cache after the run
        t_bytes = teacher_cache_bytes_per_sequence(teacher, prompt_len + L - 1)  # the last token is not cached
        row = dict(new_tokens=L, hybrid_tok_s=h_tps, teacher_tok_s=t_tps, speedup=h_tps / t_tps,
                   hybrid_state_bytes_per_seq=h_bytes, teacher_state_bytes_per_seq=t_bytes,
                   memory_ratio=h_bytes / t_bytes)
        rows.append(row)
        print(f"{L:>8} {h_tps:>13.0f} {t_tps:>14.0f} {h_tps / t_tps:>7.2f}x {h_bytes / 2**20:>14.2f} MiB "
              f"{t_bytes / 2**20:>6.2f} MiB {h_bytes / t_bytes:>6.3f}")
    results["hybrid_vs_teacher"] = rows
    (out_path / "rollout.json").write_text(json.dumps(results, indent=2))
    _plot(rows, out_path / "rollout.png")
    print(f"\nwrote {out_path / 'rollout.json'} and {out_path / 'rollout.png'}")
    return results


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["new_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["hybrid_tok_s"] for r in rows], "o-", label="hybrid, h1rl engine")
    ax.plot(lengths, [r["teacher_tok_s"] for r in rows], "s-", label="teacher, generate (static cache)")
    for r in rows:
        ax.annotate(f"{r['speedup']:.2f}x", (r["new_tokens"], r["hybrid_tok_s"]), textcoords="offset points",
                    xytext=(0, 6), ha="center")
    ax.set_xlabel("generated tokens per sequence")
    ax.set_ylabel("tokens / s (all rows)")
    ax.set_xscale("log", base=2)
    ax.set_title("Rollout throughput, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
