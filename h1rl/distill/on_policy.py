"""On-policy distillation: training batches whose completions the student samples itself (GKD).

Why: distilling on fixed data (the teacher's traces or the dataset's solutions) trains the student on prefixes it
would not produce itself; at generation time its own small errors lead it into states it never learned to recover
from (exposure bias). On-policy distillation (Agarwal et al. 2024, GKD; Thinking Machines 2025, "on-policy
distillation") samples the completion from the student and trains it toward the teacher's next-token distribution
on those tokens: the same per-token KL, on the student's own trajectories. With the reverse KL (h1rl's default) this
is exactly GKD's on-policy objective. TRL's `GKDTrainer` does this for transformers with `generate`; h1rl does it in
its own `DistillTrainer` because the sampling is the rollout engine (one prefill per prompt, constant-size Mamba
state) and the loss is h1rl's chunked KL that never materialises full logits.

How: `student_batch` takes a training batch as the distillation collator lays it out (right-padded rows, `labels`
-100 outside the assistant turn), keeps each row's prompt (every token before its first target: the chat template's
generation prompt), samples one completion per row with `h1rl.rollout.RolloutEngine`, and returns a batch of the
same layout: prompt + sampled completion (the stop token included), labels on the completion only. Rows without
targets are kept as they are. A row whose assistant turn is not its last message (several assistant turns) is an
error naming the row of the batch: only the final turn can be replaced.

Which steps: `OnPolicyConfig.fraction` of the optimizer steps (GKD's lambda), drawn from (seed, step), so a resumed
run makes the same choices; the sampling seed is also (seed, step, micro-batch), and each process samples its rows of
one shared stream, as in GRPO (`h1rl.rollout.sampling.SamplingParams.stream_rows`).
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase

from h1rl.distill.config import OnPolicyConfig
from h1rl.distill.data import make_collator
from h1rl.models.modeling import HybridForCausalLM
from h1rl.rollout.engine import RolloutEngine
from h1rl.rollout.sampling import SamplingParams


def is_on_policy_step(config: OnPolicyConfig, seed: int, step: int) -> bool:
    """Whether optimizer step `step` trains on student samples: a draw from (seed, step) below `fraction`."""
    if config.fraction <= 0:
        return False
    return config.fraction >= 1 or random.Random(f"on_policy/{seed}/{step}").random() < config.fraction


def sampling_seed(seed: int, step: int, micro_batch: int) -> int:
    """The engine's seed for a micro-batch of an on-policy step: the same in every process and every run (string
    seeds of `random.Random` are hashed with SHA-512, unlike `hash()`, which Python salts per process)."""
    return random.Random(f"on_policy_sample/{seed}/{step}/{micro_batch}").getrandbits(62)


def split_prompts(batch: dict[str, torch.Tensor]) -> list[list[int] | None]:
    """Each row's prompt: the tokens before its first target (None for a row with no target).

    batch: input_ids (B, T), attention_mask (B, T), labels (B, T) with -100 outside the assistant turn.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prompts: list[list[int] | None] = []
    for i in range(ids.shape[0]):
        targets = (labels[i] != -100).nonzero().flatten()  # (n,)
        if targets.numel() == 0:
            prompts.append(None)
            continue
        first, last = int(targets[0]), int(targets[-1])
        if int((labels[i, first : last + 1] == -100).sum()) > 0:
            raise ValueError(
                f"on-policy distillation: row {i} of the batch has targets in more than one span (several assistant "
                "turns?); only a conversation whose last message is its only assistant turn can be sampled anew"
            )
        if first == 0 or int(mask[i, :first].sum()) != first:
            raise ValueError(f"on-policy distillation: row {i} of the batch has no prompt before its first target")
        prompts.append(ids[i, :first].tolist())
    return prompts


@torch.no_grad()
def student_batch(
    model: HybridForCausalLM,
    batch: dict[str, torch.Tensor],
    params: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`batch` with each row's completion sampled by `model` (see the module docstring); and rollout statistics.

    Returns input_ids, attention_mask, labels (B, T') padded by the distillation collator (`make_collator`), rows
    cut at `max_length`.
    """
    prompts = split_prompts(batch)
    sampled = [i for i, p in enumerate(prompts) if p is not None]
    real = batch["attention_mask"].bool()  # (B, T)
    rows = [batch["input_ids"][i][real[i]].tolist() for i in range(len(prompts))]
    labels = [batch["labels"][i][real[i]].tolist() for i in range(len(prompts))]
    stats = {"completion_length": 0.0, "stopped": 0.0, "rollout_seconds": 0.0}
    if sampled:
        engine = RolloutEngine(model, pad_token_id=tokenizer.pad_token_id)
        rollout = engine.generate([prompts[i] for i in sampled], 1, params)
        for i, completion in zip(sampled, rollout.completions()):
            rows[i] = prompts[i] + completion
            labels[i] = [-100] * len(prompts[i]) + completion
        stats = {
            "completion_length": float(rollout.lengths.float().mean()),
            "stopped": sum(r == "stop" for r in rollout.finish_reasons) / len(sampled),
            "rollout_seconds": rollout.stats["prefill_s"] + rollout.stats["decode_s"],
        }
    features = [{"input_ids": row[:max_length], "attention_mask": [1] * len(row[:max_length]),
                 "labels": lab[:max_length]} for row, lab in zip(rows, labels)]
    out = make_collator(tokenizer)(features)
    return {k: v.to(batch["input_ids"].device) for k, v in out.items()}, stats
