"""The bundled tiny teacher: its architecture (a standard `MistralForCausalLM`) and the supervised loop that teaches
it the arithmetic task. `scripts/build_assets.py` runs both and writes the checkpoint into the package data.

Training is plain next-token cross-entropy on the assistant part of each chat (the step lines, the boxed answer and
`<|end|>`), on train-split problems only, with AdamW and a linear-warmup cosine schedule. Batches are right-padded
(padding after the last real token, labels -100 there), so no attention mask is needed. Everything that draws a
random number is seeded from `TeacherConfig.seed`: on one machine with one thread count the weights are identical
from run to run (float sums, hence weights, differ across thread counts and CPUs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from transformers import MistralConfig, MistralForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from h1rl.data.arithmetic import DEFAULT_LEVEL, ArithmeticTask, to_chat

logger = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """Size of the teacher and how it is trained (defaults: the bundled teacher)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    difficulty: int = DEFAULT_LEVEL  # level of h1rl.data.arithmetic.LEVELS the teacher learns
    n_train: int = 40_000  # distinct train-split problems drawn once; batches sample from them
    # The bundled teacher stops short of convergence on purpose: at level 3 this model climbs from ~10% to ~100%
    # greedy test accuracy between 800 and 2000 steps; 1100 leaves it good but imperfect (see metrics.json). On that
    # slope a few hundred steps, or another thread count, move the accuracy by tens of points.
    steps: int = 1100
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 100

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TeacherConfig: hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) and "
                f"num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        for name in ("steps", "batch_size", "n_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"TeacherConfig: {name} must be >= 1, got {getattr(self, name)}")


def build_teacher(tokenizer: PreTrainedTokenizerBase, cfg: TeacherConfig) -> MistralForCausalLM:
    """A freshly initialised (seeded) Mistral model sized by `cfg`, with the tokenizer's special ids in its configs."""
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def encode_sft(rows: list[dict], tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None
               ) -> list[tuple[list[int], int]]:
    """Each row as (chat token ids up to the reply's EOS, prompt length): the loss covers ids[prompt_length:]."""
    out = []
    for i, row in enumerate(rows):
        messages = to_chat(row, system_prompt)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        if list(ids[: len(prompt)]) != list(prompt):
            raise ValueError(f"encode_sft: row {i}: the chat template's prompt is not a prefix of the full chat")
        ends = [j for j, tok in enumerate(ids) if tok == tokenizer.eos_token_id]
        if not ends or ends[-1] < len(prompt):
            raise ValueError(f"encode_sft: row {i}: the chat template put no EOS after the assistant's reply")
        out.append((list(ids[: ends[-1] + 1]), len(prompt)))  # nothing after the final EOS is trained on
    return out


def train_teacher(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: TeacherConfig,
                  rows: list[dict] | None = None) -> list[float]:
    """Train `model` (any causal LM, hybrids too) in place on `rows` (default: `cfg.n_train` train-split problems,
    their `solution` as the assistant reply); returns the loss per step."""
    if rows is None:
        rows = ArithmeticTask(cfg.difficulty, cfg.seed).generate(cfg.n_train, "train")
    data = encode_sft(rows, tokenizer)
    pad = tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        pick = torch.randint(len(data), (cfg.batch_size,), generator=generator).tolist()
        T = max(len(data[i][0]) for i in pick)
        ids = torch.full((cfg.batch_size, T), pad, dtype=torch.long)  # (B, T) right-padded
        labels = torch.full((cfg.batch_size, T), -100, dtype=torch.long)
        for b, i in enumerate(pick):
            seq, prompt_len = data[i]
            ids[b, : len(seq)] = torch.tensor(seq)
            labels[b, prompt_len : len(seq)] = ids[b, prompt_len : len(seq)]
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = losses[-cfg.log_every :]
            logger.info("teacher step %d/%d  loss %.4f  %.1fs", step + 1, cfg.steps, sum(recent) / len(recent),
                        time.perf_counter() - start)
    model.eval()
    return losses
