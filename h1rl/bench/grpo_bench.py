"""`h1rl bench grpo`: wall time of a GRPO step, HybridGRPOTrainer vs stock trl.GRPOTrainer, same model and settings.

Both trainers run the same random-weight hybrid (the `h1rl bench rollout` pair: a Mistral teacher converted with
every other layer m2), the same prompts, reward, seed and `GRPOConfig` (G completions per prompt, up to N new
tokens); stock TRL generates with `model.generate`, h1rl with its engine. Each runs `--repeats` optimizer steps after
one warm-up step; the figure is the median of TRL's own `step_time` log, so generation, scoring, the
forward/backward and the optimizer step are all counted. A few stop tokens give completions a spread of lengths
(a random model stops after about `vocab / stops` tokens), as in RL.

Run: `h1rl bench grpo [--new-tokens 256] [--generations 8] [--repeats 2] [--no-gradient-checkpointing] [--device cuda]
[--length-chunks 4]` (the last is HybridGRPOTrainer's `length_chunks`, to measure what splitting by length brings)
"""

from __future__ import annotations

import statistics
import tempfile

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
