"""`h1rl bench grpo`: wall time of a GRPO step, HybridGRPOTrainer vs stock trl.GRPOTrainer, same model and settings.

Both trainers run the same random-weight hybrid (the `h1rl bench rollout` pair: a Mistral teacher converted with
every other layer m2), the same prompts, reward, seed and `GRPOConfig` (G completions per prompt, up to N new
tokens); stock TRL generates with `model.generate`, h1rl with its engine. Each runs `--repeats` optimizer steps after
one warm-up step; the figure is the median of TRL's own `step_time` log, so generation, scoring, the
forward/backward and the optimizer step are all counted. A few stop tokens give completions a spread of lengths
(a random model stops after about `vocab / stops` tokens), as in RL.

Run: `h1rl bench grpo [--new-tokens 256] [--generations 8] [--repeats 2] [--no-gradient-checkpointing] [--device cuda]
[--length-chunks 4]` (the last is HybridGRPOTrainer's `length_chunks`, to measure what splitting by length brings);
`h1rl bench grpo --help` lists every mode and knob (`main`).

`h1rl bench grpo --against-teacher` (`run_against_teacher`) is the RL-level comparison the hybrid exists for: one
GRPO step of the hybrid under `HybridGRPOTrainer` and one of its teacher under stock `trl.GRPOTrainer`, side by side
in one run, at completion caps of 1k, 2k and 4k (and stock TRL on the hybrid, at the smallest cap). Shapes: a
Mistral-style teacher (hidden 512, 8 layers, 8 heads / 2 KV heads, vocab 32k), the hybrid converted from it with
every other layer m2; 4 prompts x G = 8, prompts of 128 tokens. Lengths spread as in RL: both models' LM heads are
scaled to near-uniform next-token distributions and `vocab * 3 / cap` tokens stop a completion, so every row of
either model stops after a geometric number of tokens of mean cap / 3: most rows stop well before the cap, a few
(about 5%) reach it, and both models draw their lengths from the same distribution (the mean lengths are printed
to show it). Reported per step (median of the timed steps, after one warm-up step at a short cap): wall time, the
rollout's share, tokens/s, and peak resident memory of the process during the step (Linux: VmHWM, reset before
each step). Writes JSON and a PNG plot; `--resume` keeps the runs an interrupted run already measured.

`--partial-rollouts` (`run_partial_rollouts_benchmark`): the hybrid's steps at `--caps[0]` with partial rollouts
off and on, same shapes. `--overlap-scoring` (`run_overlap_benchmark`): math-verify scoring after the rollout vs
while it decodes.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from h1rl.bench.rollout_bench import build_pair


def word_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` made-up words (no downloads), with <pad>=0 and <eos>=1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def distinct_words(completions, **kwargs):
    return [float(len(set(c.split()))) for c in completions]


def time_trainer(trainer_cls, model, tokenizer, dataset, args, **options) -> list[dict]:
    """The log entry of every optimizer step (`step_time`, and `rollout/seconds` for the hybrid trainer)."""
    trainer = trainer_cls(model=model, reward_funcs=distinct_words, args=args, train_dataset=dataset,
                          processing_class=tokenizer, **options)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "step_time" in entry]


def run_grpo_benchmark(new_tokens: int = 256, generations: int = 8, prompts: int = 4, steps: int = 2,
                       hidden: int = 256, layers: int = 8, vocab: int = 512,
                       gradient_checkpointing: bool = True, device: str = "cpu", length_chunks: int = 4,
                       variants: dict[str, dict] | None = None) -> dict:
    """Median step wall time of both trainers on `device` ("cpu" or "cuda", float32), and the speed-up.

    `variants`: more HybridGRPOTrainer settings to time in the same run, name -> its keyword arguments (the GPU
    check uses it to see whether prompt sharing pays where mamba-ssm's scan cannot continue from a state)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from h1rl.rl import HybridGRPOTrainer

    tokenizer = word_tokenizer(vocab)
    dataset = Dataset.from_dict({"prompt": [" ".join(f"w{(7 * i + j) % 400}" for j in range(32)) for i in range(64)]})
    runs = [("trl.GRPOTrainer (generate)", GRPOTrainer, {}),
            ("h1rl HybridGRPOTrainer", HybridGRPOTrainer, {"length_chunks": length_chunks})]
    runs += [(f"h1rl, {name}", HybridGRPOTrainer, {"length_chunks": length_chunks, **options})
             for name, options in (variants or {}).items()]
    results, hybrid_details = {}, {}
    for name, cls, options in runs:
        _, hybrid = build_pair(hidden, layers, vocab, seed=0)
        hybrid.train()
        hybrid.generation_config.eos_token_id = list(range(1, 1 + vocab // 128))  # spread completion lengths
        with tempfile.TemporaryDirectory() as out:
            args = GRPOConfig(
                output_dir=out, use_cpu=device == "cpu", bf16=False, per_device_train_batch_size=prompts * generations,
                num_generations=generations, max_completion_length=new_tokens, max_steps=steps + 1,
                learning_rate=1e-5, logging_steps=1, report_to=[], save_strategy="no", seed=0, beta=0.0,
                disable_tqdm=True, gradient_checkpointing=gradient_checkpointing,  # TRL's default: True
            )
            logs = time_trainer(cls, hybrid, tokenizer, dataset, args, **options)[1:]  # drop the warm-up step
        results[name] = statistics.median(entry["step_time"] for entry in logs)
        if cls is HybridGRPOTrainer:
            hybrid_details[name] = {
                "rollout_s": statistics.median(entry["rollout/seconds"] for entry in logs),
                "forward_positions": statistics.median(entry.get("train/forward_positions", 1.0) for entry in logs),
            }
    base = results["trl.GRPOTrainer (generate)"]
    checkpointing = "on" if gradient_checkpointing else "off"
    print(f"GRPO step wall time, hidden {hidden}, {layers} layers (half m2), {prompts} prompts x G={generations}, "
          f"up to {new_tokens} new tokens, {device}, gradient checkpointing {checkpointing}, "
          f"h1rl length_chunks {length_chunks}, torch threads {torch.get_num_threads()} (median of {steps} steps)")
    for name, seconds in results.items():
        detail = hybrid_details.get(name)
        extra = "" if detail is None else (f"  {base / seconds:.2f}x  (rollout {detail['rollout_s']:.2f} s; training "
                                           f"pass over {detail['forward_positions']:.0%} of TRL's padded positions)")
        print(f"  {name:<30} {seconds:8.2f} s{extra}")
    settings = dict(new_tokens=new_tokens, generations=generations, prompts=prompts, steps=steps, hidden=hidden,
                    layers=layers, vocab=vocab, gradient_checkpointing=gradient_checkpointing, device=device,
                    length_chunks=length_chunks)
    return {"step_s": results, "hybrid": hybrid_details, "speedup": base / results["h1rl HybridGRPOTrainer"],
            "speedups": {name: base / seconds for name, seconds in results.items() if name in hybrid_details},
            "settings": settings}


# ----------------------------------------------------------------------------------------------------------------
# the hybrid against its teacher, one GRPO step each (`h1rl bench grpo --against-teacher`)


def _timed(trainer_cls):
    """`trainer_cls` timing the rollout of each training step: its generation calls (`_generate_single_turn`, either
    trainer's rollout) and, with partial rollouts, the rounds of `_partial_rollout_step`, summed per step."""

    class Timed(trainer_cls):
        rollout_seconds: list[float]

        def training_step(self, *args, **kwargs):
            self._rollout_clock = 0.0
            try:
                return super().training_step(*args, **kwargs)
            finally:
                self.rollout_seconds.append(self._rollout_clock)

        def _clocked(self, method: str, *args, **kwargs):
            start = time.perf_counter()
            try:
                return getattr(super(), method)(*args, **kwargs)
            finally:
                self._rollout_clock += time.perf_counter() - start

        def _generate_single_turn(self, *args, **kwargs):
            return self._clocked("_generate_single_turn", *args, **kwargs)

        def _partial_rollout_step(self, *args, **kwargs):
            return self._clocked("_partial_rollout_step", *args, **kwargs)

    Timed.__name__ = trainer_cls.__name__
    return Timed


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


class _StepMemory:
    """A `TrainerCallback` recording the process's peak resident memory of each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.peaks: list[float] = []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                _reset_peak_rss()

            def on_step_end(self, args, state, control, **kwargs):
                outer.peaks.append(_peak_rss_gib())

        self.callback = Callback()


def _timed_steps(trainer_cls, model, tokenizer, dataset, cap: int, steps: int, prompts: int, generations: int,
                 device: str, gradient_checkpointing: bool, warmup_cap: int = 0, **h1rl_options):
    """`steps` GRPO steps of `model` at completion cap `cap` (after one warm-up step at `warmup_cap` by a trainer of
    its own, when > 0): their log entries, rollout seconds and peak resident memory (GiB). `h1rl_options` are
    `HybridGRPOConfig` fields (then `trainer_cls` must be `HybridGRPOTrainer`)."""
    from transformers import PrinterCallback
    from trl import GRPOConfig

    from h1rl.rl import HybridGRPOConfig

    memory = _StepMemory()
    logs, rollout_s = [], []
    phases = (("warm-up", warmup_cap, 1),) if warmup_cap else ()
    with tempfile.TemporaryDirectory() as tmp:
        for phase, max_len, max_steps in (*phases, ("timed", cap, steps)):
            args = (HybridGRPOConfig if h1rl_options else GRPOConfig)(
                output_dir=tmp, use_cpu=device == "cpu", bf16=False,
                per_device_train_batch_size=prompts * generations, num_generations=generations,
                max_completion_length=max_len, max_steps=max_steps, learning_rate=1e-6, logging_steps=1,
                report_to=[], save_strategy="no", seed=0, beta=0.0, disable_tqdm=True,
                gradient_checkpointing=gradient_checkpointing, **h1rl_options,
            )
            trainer = _timed(trainer_cls)(model=model, reward_funcs=distinct_words, args=args,
                                          train_dataset=dataset, processing_class=tokenizer,
                                          callbacks=[memory.callback] if phase == "timed" else None)
            trainer.rollout_seconds = []
            trainer.remove_callback(PrinterCallback)  # the tables say what matters
            trainer.train()
            logs = [e for e in trainer.state.log_history if "step_time" in e]
            rollout_s = trainer.rollout_seconds
    return logs, rollout_s, memory.peaks


def teacher_and_hybrid(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, seed: int = 0):
    """A random Mistral teacher and its hybrid (every other layer m2), with LM heads scaled to near-uniform
    next-token distributions (logits ~1e-3), so that a stop set of k tokens ends a completion with probability
    about k / vocab at every token, in either model."""
    from transformers import MistralConfig, MistralForCausalLM

    from h1rl.models.convert import convert_teacher

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768, sliding_window=None,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    teacher = MistralForCausalLM(cfg)
    hybrid = convert_teacher(teacher, ["m2" if i % 2 else "t" for i in range(layers)], ssm_cfg={"d_state": 16},
                             seed=seed)
    with torch.no_grad():
        for model in (teacher, hybrid):
            model.lm_head.weight.mul_(1e-3)
    return teacher.train(), hybrid.train()


def run_against_teacher(caps: tuple[int, ...] = (1024, 2048, 4096), prompts: int = 4, generations: int = 8,
                        prompt_len: int = 128, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 2,
                        vocab: int = 32000, steps: int = 1, device: str = "cpu", gradient_checkpointing: bool = True,
                        warmup_cap: int = 32, out_dir: str = "bench-grpo", resume: bool = False,
                        only: str | None = None) -> dict:
    """One GRPO step of the hybrid (HybridGRPOTrainer) and of its teacher (trl.GRPOTrainer) per cap, side by side;
    stock TRL on the hybrid at the smallest cap. See the module docstring.

    Each measured run is appended to `grpo_vs_teacher.runs.jsonl` as it finishes (a run at 4k takes about an hour
    on 2 CPU cores); with `resume`, runs already there under the same settings are kept, not measured again.
    `only` ("teacher" or "hybrid"): measure that model's runs alone (the other's come from the journal, or are
    missing from the table)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from h1rl.rl import HybridGRPOTrainer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(vocab)
    words = [" ".join(f"w{(13 * i + 7 * j) % (vocab - 3)}" for j in range(prompt_len)) for i in range(64)]
    dataset = Dataset.from_dict({"prompt": words})
    settings = dict(caps=list(caps), prompts=prompts, generations=generations, prompt_len=prompt_len, hidden=hidden,
                    layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, steps=steps, device=device,
                    gradient_checkpointing=gradient_checkpointing, torch_threads=torch.get_num_threads())
    print(f"GRPO step, hybrid (HybridGRPOTrainer) vs teacher (trl.GRPOTrainer): hidden {hidden}, {layers} layers, "
          f"{heads}/{kv_heads} heads, vocab {vocab}, {prompts} prompts x G={generations}, prompts of {prompt_len} "
          f"tokens, {device}, gradient checkpointing {'on' if gradient_checkpointing else 'off'}, "
          f"torch threads {torch.get_num_threads()}")
    journal = out / "grpo_vs_teacher.runs.jsonl"
    same = {k: v for k, v in settings.items() if k != "caps"}
    done = {}
    if resume and journal.exists():
        for line in journal.read_text().splitlines():
            entry = json.loads(line)
            if entry["settings"] == same:
                done[entry["row"]["cap"], entry["row"]["model"], entry["row"]["trainer"]] = entry["row"]
    elif journal.exists():
        journal.unlink()
    rows = []
    for cap in caps:
        runs = [("teacher", "trl.GRPOTrainer", GRPOTrainer), ("hybrid", "HybridGRPOTrainer", HybridGRPOTrainer)]
        if cap == min(caps):
            runs.append(("hybrid", "trl.GRPOTrainer", GRPOTrainer))
        stops = list(range(1, 1 + max(1, round(vocab * 3 / cap))))  # mean length ~ cap / 3
        for model_name, trainer_name, trainer_cls in runs:
            if only is not None and model_name != only and (cap, model_name, trainer_name) not in done:
                continue
            if (cap, model_name, trainer_name) in done:
                row = done[cap, model_name, trainer_name]
                rows.append(row)
                print(f"  cap {cap:5d}  {model_name:7s} {trainer_name:18s} step {row['step_s']:8.1f} s  (kept from "
                      f"{journal})")
                continue
            teacher, hybrid = teacher_and_hybrid(hidden, layers, heads, kv_heads, vocab)
            model = (teacher if model_name == "teacher" else hybrid).to(device)
            model.generation_config.eos_token_id = stops
            logs, rollout_s, peaks = _timed_steps(trainer_cls, model, tokenizer, dataset, cap, steps, prompts,
                                                  generations, device, gradient_checkpointing, warmup_cap)
            step = statistics.median(e["step_time"] for e in logs)
            rollout = statistics.median(rollout_s)
            mean_len = statistics.median(e["completions/mean_length"] for e in logs)
            row = {"cap": cap, "model": model_name, "trainer": trainer_name, "step_s": step, "rollout_s": rollout,
                   "rest_s": step - rollout, "mean_completion": mean_len,
                   "max_completion": statistics.median(e["completions/max_length"] for e in logs),
                   "tokens_per_s": mean_len * prompts * generations / step,
                   "peak_rss_gib": max(peaks) if peaks else float("nan")}
            rows.append(row)
            with journal.open("a") as f:
                f.write(json.dumps({"settings": same, "row": row}) + "\n")
            print(f"  cap {cap:5d}  {model_name:7s} {trainer_name:18s} step {step:8.1f} s  rollout {rollout:8.1f} s  "
                  f"rest {step - rollout:7.1f} s  mean/max completion {mean_len:6.0f}/{row['max_completion']:5.0f}  "
                  f"{row['tokens_per_s']:7.1f} tok/s  peak RSS {row['peak_rss_gib']:.2f} GiB")
    speedups = {}
    for cap in caps:
        by = {(r["model"], r["trainer"]): r["step_s"] for r in rows if r["cap"] == cap}
        if ("teacher", "trl.GRPOTrainer") not in by or ("hybrid", "HybridGRPOTrainer") not in by:
            print(f"  cap {cap:5d}: no speed-up (a run is missing)")
            continue
        speedups[cap] = {"hybrid_vs_teacher": by["teacher", "trl.GRPOTrainer"] / by["hybrid", "HybridGRPOTrainer"]}
        if ("hybrid", "trl.GRPOTrainer") in by:
            speedups[cap]["h1rl_vs_trl_same_hybrid"] = by["hybrid", "trl.GRPOTrainer"] / by["hybrid",
                                                                                          "HybridGRPOTrainer"]
        same = speedups[cap].get("h1rl_vs_trl_same_hybrid")
        print(f"  cap {cap:5d}: speed-up of the hybrid's step over the teacher's "
              f"{speedups[cap]['hybrid_vs_teacher']:.2f}x"
              + ("" if same is None else f"; of h1rl over stock TRL on the same hybrid {same:.2f}x"))
    result = {"settings": settings, "rows": rows, "speedups": speedups}
    (out / "grpo_vs_teacher.json").write_text(json.dumps(result, indent=2))
    _plot_against_teacher(rows, out / "grpo_vs_teacher.png")
    print(f"wrote {out / 'grpo_vs_teacher.json'} and {out / 'grpo_vs_teacher.png'}")
    return result


def run_partial_rollouts_benchmark(cap: int = 1024, budget: int | None = None, extra_groups: int | None = None,
                                   steps: int = 4, prompts: int = 4, generations: int = 8, prompt_len: int = 128,
                                   hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 2,
                                   vocab: int = 32000, device: str = "cpu", gradient_checkpointing: bool = True,
                                   out_dir: str = "bench-grpo") -> dict:
    """The hybrid's GRPO steps at `cap` (the `--against-teacher` shapes and length spread) with partial rollouts off,
    off with the importance-sampling correction they force on (what a bf16 run pays anyway: one no-grad forward of
    the batch per step for the old policy's log-probs), and on (`partial_rollout_budget` = `budget`, default cap / 4;
    `partial_rollout_extra_groups` = `extra_groups`, default `prompts`), `steps` steps each in one trainer: the first
    step with partial rollouts fills the pool, so the figure is the median of the later steps, every way. All train
    B groups of G completed rows per step; with partial rollouts some were started in earlier steps (their rounds
    and carried groups are printed)."""
    from datasets import Dataset

    from h1rl.rl import HybridGRPOTrainer

    budget = budget or cap // 4
    extra_groups = extra_groups or prompts
    tokenizer = word_tokenizer(vocab)
    words = [" ".join(f"w{(13 * i + 7 * j) % (vocab - 3)}" for j in range(prompt_len)) for i in range(64)]
    dataset = Dataset.from_dict({"prompt": words})
    stops = list(range(1, 1 + max(1, round(vocab * 3 / cap))))
    print(f"GRPO steps of the hybrid (HybridGRPOTrainer), cap {cap}, partial rollouts off, off with the IS "
          f"correction, on (budget {budget} "
          f"decode steps per round, {extra_groups} extra groups): hidden {hidden}, {layers} layers, {prompts} prompts "
          f"x G={generations}, {device}, torch threads {torch.get_num_threads()}")
    runs = {}
    arms = (("off", {}),
            # what partial rollouts force on, alone: the importance-sampling correction's old-policy forward, which
            # a bf16 run pays with or without them (on by default off float32)
            ("off + IS", {"importance_sampling_correction": True}),
            ("on", {"partial_rollout_budget": budget, "partial_rollout_extra_groups": extra_groups}))
    for name, options in arms:
        _, hybrid = teacher_and_hybrid(hidden, layers, heads, kv_heads, vocab)
        hybrid.to(device).generation_config.eos_token_id = stops
        logs, rollout_s, peaks = _timed_steps(HybridGRPOTrainer, hybrid, tokenizer, dataset, cap, steps, prompts,
                                              generations, device, gradient_checkpointing, **options)
        later = slice(1, None) if steps > 1 else slice(None)
        run = {"step_s": [e["step_time"] for e in logs], "rollout_s": rollout_s,
               "mean_completion": [e["completions/mean_length"] for e in logs],
               "rounds": [e.get("partial_rollouts/rounds", 1.0) for e in logs],
               "carried_groups": [e.get("partial_rollouts/carried_groups", 0.0) for e in logs],
               "peak_rss_gib": max(peaks) if peaks else float("nan")}
        run["median_step_s"] = statistics.median(run["step_s"][later])
        run["median_rollout_s"] = statistics.median(run["rollout_s"][later])
        run["trained_tokens_per_s"] = (statistics.median(run["mean_completion"][later]) * prompts * generations
                                       / run["median_step_s"])
        runs[name] = run
        print(f"  partial rollouts {name:8s}: steps {' '.join(f'{t:.1f}' for t in run['step_s'])} s (median after "
              f"the first {run['median_step_s']:.1f} s, rollout {run['median_rollout_s']:.1f} s); rounds "
              f"{run['rounds']}; carried groups {run['carried_groups']}; trained completions of mean "
              f"{' '.join(f'{m:.0f}' for m in run['mean_completion'])} tokens; "
              f"{run['trained_tokens_per_s']:.1f} trained tok/s; peak RSS {run['peak_rss_gib']:.2f} GiB")
    gain = runs["off"]["median_step_s"] / runs["on"]["median_step_s"]
    gain_is = runs["off + IS"]["median_step_s"] / runs["on"]["median_step_s"]
    rollout_gain = runs["off"]["median_rollout_s"] / runs["on"]["median_rollout_s"]
    print(f"  step-time gain of partial rollouts: {gain:.2f}x against the float32 default (no correction), "
          f"{gain_is:.2f}x against the same step with the importance-sampling correction (a bf16 run's default); "
          f"rollout {rollout_gain:.2f}x")
    result = {"settings": dict(cap=cap, budget=budget, extra_groups=extra_groups, steps=steps, prompts=prompts,
                               generations=generations, hidden=hidden, layers=layers, vocab=vocab, device=device,
                               torch_threads=torch.get_num_threads()), "runs": runs, "gain": gain,
              "gain_vs_corrected": gain_is, "rollout_gain": rollout_gain}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_partial_rollouts.json").write_text(json.dumps(result, indent=2))
    return result


def _plot_against_teacher(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (model, trainer), style in ((("teacher", "trl.GRPOTrainer"), "s-"), (("hybrid", "HybridGRPOTrainer"), "o-"),
                                    (("hybrid", "trl.GRPOTrainer"), "^")):
        points = [r for r in rows if r["model"] == model and r["trainer"] == trainer]
        if points:
            ax.plot([r["cap"] for r in points], [r["step_s"] for r in points], style, label=f"{model}, {trainer}")
            ax.plot([r["cap"] for r in points], [r["rollout_s"] for r in points], style[0] + ":", alpha=0.5,
                    color=ax.lines[-1].get_color(), label="  its rollout")
    teacher = {r["cap"]: r["step_s"] for r in rows if r["model"] == "teacher"}
    for r in rows:
        if r["trainer"] == "HybridGRPOTrainer" and r["cap"] in teacher:
            ax.annotate(f"{teacher[r['cap']] / r['step_s']:.2f}x", (r["cap"], r["step_s"]), textcoords="offset points",
                        xytext=(0, -14), ha="center")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("completion cap (tokens; mean length cap / 3)")
    ax.set_ylabel("seconds per GRPO step")
    ax.set_title("One GRPO step: hybrid vs its teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# scoring overlapped with decoding (`h1rl bench grpo --overlap-scoring`)


def _clock_method(obj, name: str) -> list[float]:
    """Wrap `obj.name` so that each call's wall time is appended to the returned list."""
    method, seconds = getattr(obj, name), []

    def clocked(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(obj, name, clocked)
    return seconds


def math_tokenizer(vocab: int):
    """`word_tokenizer` whose words include digits, `\\boxed{` and `}`, so that random completions carry boxed
    answers for math-verify to check."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "\\boxed{", "}"] + [str(d) for d in range(10)]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def run_overlap_benchmark(new_tokens: int = 256, prompts: int = 4, generations: int = 8, steps: int = 3,
                          hidden: int = 256, layers: int = 8, vocab: int = 512, rounds: int = 2) -> dict:
    """GRPO steps scored by math-verify (`accuracy_reward`), with `overlap_scoring` off and on, alternating in one
    run: the same completions and rewards (seeded), the checks run after the rollout or while it decodes. `}` ends a
    completion, so rows finish at different steps with `\\boxed{...}` answers (about 1 in 30 tokens is a digit),
    checked against MATH-style references (fractions, roots, polynomials, sets)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from h1rl.rewards import accuracy_reward
    from h1rl.rl import HybridGRPOConfig, HybridGRPOTrainer

    tokenizer = math_tokenizer(vocab)
    answers = [  # MATH-style references: math-verify parses each into sympy and compares, as on real data
        "\\frac{1}{3}+\\sqrt{2}", "x^2+2x+1", "\\frac{\\pi}{4}", "(x+1)^2", "2\\sqrt{2}", "\\{1, 2, 3\\}", "7",
        "\\frac{3}{4}"]
    rows = {"prompt": [" ".join(f"w{(7 * i + j) % 400}" for j in range(32)) for i in range(64)],
            "answer": [answers[i % len(answers)] for i in range(64)]}
    dataset = Dataset.from_dict(rows)
    times: dict[bool, list[float]] = {False: [], True: []}
    rewards: dict[bool, list[float]] = {False: [], True: []}
    scoring: dict[bool, list[float]] = {False: [], True: []}  # seconds in TRL's scoring call, per step
    for _ in range(rounds):
        for overlap in (False, True):
            _, hybrid = build_pair(hidden, layers, vocab, seed=0)
            hybrid.train()
            hybrid.config.eos_token_id = tokenizer.eos_token_id  # as the tokenizer says, or transformers resets it
            hybrid.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("}")]
            with tempfile.TemporaryDirectory() as out, accuracy_reward() as reward:
                args = HybridGRPOConfig(
                    output_dir=out, per_device_train_batch_size=prompts * generations, num_generations=generations,
                    max_completion_length=new_tokens, max_steps=steps + 1, learning_rate=1e-5, logging_steps=1,
                    report_to=[], save_strategy="no", seed=0, beta=0.0, disable_tqdm=True, overlap_scoring=overlap,
                    gradient_checkpointing=False,
                )
                trainer = HybridGRPOTrainer(model=hybrid, reward_funcs=reward, args=args, train_dataset=dataset,
                                            processing_class=tokenizer)
                trainer.remove_callback(PrinterCallback)
                calls = _clock_method(trainer, "_calculate_rewards")
                trainer.train()
            logs = [e for e in trainer.state.log_history if "step_time" in e][1:]  # drop the warm-up step
            times[overlap] += [e["step_time"] for e in logs]
            scoring[overlap] += calls[1:]
            rewards[overlap] = [e["reward"] for e in logs]
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"GRPO step with math-verify scoring, hidden {hidden}, {layers} layers (half m2), {prompts} prompts x "
          f"G={generations}, up to {new_tokens} tokens, torch threads {torch.get_num_threads()} (median of "
          f"{len(times[False])} steps each, alternating):")
    wait = {k: statistics.median(v) for k, v in scoring.items()}
    print(f"  scoring after the rollout  {off:7.2f} s   (the step waits {wait[False]:.2f} s in TRL's scoring call)")
    print(f"  scoring while it decodes   {on:7.2f} s   (waits {wait[True]:.2f} s); saved {off - on:+.2f} s "
          f"({(off - on) / off:+.1%}); rewards identical: {rewards[False] == rewards[True]}")
    return {"off_s": off, "on_s": on, "saved_s": off - on, "same_rewards": rewards[False] == rewards[True],
            "scoring_wait_s": {"off": wait[False], "on": wait[True]},
            "settings": dict(new_tokens=new_tokens, prompts=prompts, generations=generations, steps=steps,
                             hidden=hidden, layers=layers, vocab=vocab, rounds=rounds)}


def main(argv: list[str] | None = None) -> int:
    """`h1rl bench grpo [MODE] ...` (also `python -m h1rl.bench.grpo_bench`): one parser for every mode."""
    import argparse

    p = argparse.ArgumentParser(prog="h1rl bench grpo", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--against-teacher", action="store_true", help="the hybrid vs its teacher, per cap "
                      "(run_against_teacher)")
    mode.add_argument("--partial-rollouts", action="store_true", help="the hybrid at --caps[0] with partial "
                      "rollouts off vs on (run_partial_rollouts_benchmark)")
    mode.add_argument("--overlap-scoring", action="store_true", help="math-verify scoring after vs during the "
                      "rollout (run_overlap_benchmark)")
    default = "without a mode flag: HybridGRPOTrainer vs trl.GRPOTrainer on the same hybrid (run_grpo_benchmark)"
    p.add_argument("--new-tokens", type=int, default=256, help=f"{default}, and --overlap-scoring: the length cap")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--batch", type=int, default=4, help="distinct prompts per step")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per run, after a warm-up step (median); "
                   "default 2, with --against-teacher 1, with --partial-rollouts 4 (the first fills the pool)")
    p.add_argument("--length-chunks", type=int, default=4, help="HybridGRPOTrainer's length_chunks")
    p.add_argument("--caps", type=int, nargs="+", default=[1024, 2048, 4096], help="--against-teacher: completion "
                   "caps; --partial-rollouts: the first")
    p.add_argument("--partial-budget", type=int, default=None, help="--partial-rollouts: decode steps per round "
                   "(default cap / 4)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="turn off TRL's default activation recomputation (for every trainer)")
    p.add_argument("--out", default="bench-grpo", help="--against-teacher, --partial-rollouts: where JSON and PNG go")
    p.add_argument("--resume", action="store_true", help="--against-teacher: keep the runs already measured in --out "
                   "under the same settings")
    p.add_argument("--only", choices=["teacher", "hybrid"], default=None, help="--against-teacher: measure this "
                   "model's runs alone (with --resume, the other's come from the journal)")
    p.add_argument("--hidden", type=int, default=None, help="default 256; 512 with --against-teacher and "
                   "--partial-rollouts (their fixed shapes)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=None, help="default 512; 32000 with --against-teacher and "
                   "--partial-rollouts")
    args = p.parse_args(argv)
    long_shapes = args.against_teacher or args.partial_rollouts
    hidden = args.hidden or (512 if long_shapes else 256)
    vocab = args.vocab or (32000 if long_shapes else 512)
    checkpointing = not args.no_gradient_checkpointing
    if args.overlap_scoring:
        run_overlap_benchmark(new_tokens=args.new_tokens, prompts=args.batch, generations=args.generations,
                              steps=(args.repeats or 2) + 1, hidden=hidden, layers=args.layers)
    elif args.partial_rollouts:
        run_partial_rollouts_benchmark(cap=args.caps[0], budget=args.partial_budget, steps=args.repeats or 4,
                                       prompts=args.batch, generations=args.generations, device=args.device,
                                       hidden=hidden, layers=args.layers, vocab=vocab,
                                       gradient_checkpointing=checkpointing, out_dir=args.out)
    elif args.against_teacher:
        run_against_teacher(caps=tuple(args.caps), steps=args.repeats or 1, prompts=args.batch,
                            generations=args.generations, device=args.device, hidden=hidden, layers=args.layers,
                            vocab=vocab, gradient_checkpointing=checkpointing, out_dir=args.out, resume=args.resume,
                            only=args.only)
    else:
        run_grpo_benchmark(new_tokens=args.new_tokens, generations=args.generations, prompts=args.batch,
                           steps=args.repeats or 2, hidden=hidden, layers=args.layers, vocab=vocab,
                           gradient_checkpointing=checkpointing, device=args.device,
                           length_chunks=args.length_chunks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
