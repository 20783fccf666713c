"""A tiny teacher world for tests, docs and `h1rl.distill.report`, built locally in seconds (no downloads).

- `build_tokenizer()`: a word-level `PreTrainedTokenizerFast` with a Jinja chat template whose assistant turns are
  marked `{% generation %}` (so assistant-only losses work), `<|end|>` as EOS and `<pad>` as pad;
- `conversations(n)`: synthetic chat "reasoning traces": "add 7 and 4" -> "count 8 9 10 11 . answer 11";
- `build_teacher(tokenizer)`: a small `MistralForCausalLM`, and `train_teacher`, a plain next-token loop on the
  rendered conversations, so that the teacher has a distribution worth distilling;
- `write_toy_world(out_dir)`: all of it on disk: `teacher/` (model + tokenizer), `train.jsonl`, `calib.jsonl`.

Run: `python -m h1rl.distill.toy --out runs/toy [--steps 400]` (what recipes/distill_tiny.yaml expects).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = ["add", "and", "subtract", "from", "count", "answer", ".", "what", "is"]
MAX_NUMBER = 40
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }} <|end|>{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endif %}"
    "{% if not loop.last %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `SPECIAL + WORDS + numbers 0..MAX_NUMBER`, whitespace-split, with the chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + [str(n) for n in range(MAX_NUMBER + 1)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>",
        additional_special_tokens=SPECIAL[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` chat rows: additions / subtractions worked out by counting (the "reasoning trace"), then the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, MAX_NUMBER - 10), rng.randint(1, 8)
        if rng.random() < 0.5:
            question, steps = f"add {a} and {b}", list(range(a + 1, a + b + 1))
        else:
            a = max(a, b)
            question, steps = f"subtract {b} from {a}", list(range(a - 1, a - b - 1, -1))
        answer = f"count {' '.join(map(str, steps))} . answer {steps[-1]}"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def build_teacher(tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 4, seed: int = 0):
    """A small random `MistralForCausalLM` for `tokenizer` (4 heads of 16, 2 KV heads)."""
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 16, num_key_value_heads=max(hidden // 32, 1), max_position_embeddings=256,
        sliding_window=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    return MistralForCausalLM(config)


def train_teacher(teacher, tokenizer, rows: list[dict], steps: int, batch_size: int = 16, lr: float = 3e-3,
                  seed: int = 0) -> list[float]:
    """Next-token training on the rendered rows (AdamW, cosine); returns the loss per step. In place."""
    ids = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"] for r in rows]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    teacher.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(ids), (batch_size,), generator=gen).tolist()
        batch = tokenizer.pad({"input_ids": [ids[i] for i in pick]}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = teacher(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def write_toy_world(out_dir: str | Path, steps: int = 400, n_train: int = 512, n_calib: int = 64, hidden: int = 64,
                    layers: int = 4, seed: int = 0) -> dict[str, str]:
    """Teacher (trained `steps` steps) + tokenizer in `out_dir/teacher`, rows in `train.jsonl` and `calib.jsonl`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    train, calib = conversations(n_train, seed), conversations(n_calib, seed + 1)
    teacher = build_teacher(tokenizer, hidden, layers, seed)
    losses = train_teacher(teacher, tokenizer, train, steps, seed=seed) if steps else []
    teacher.eval().save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    for name, rows in (("train.jsonl", train), ("calib.jsonl", calib)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "teacher": str(out / "teacher"),
        "train": str(out / "train.jsonl"),
        "calib": str(out / "calib.jsonl"),
        "final_teacher_loss": f"{sum(losses[-20:]) / max(len(losses[-20:]), 1):.4f}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h1rl.distill.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=400, help="teacher training steps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    paths = write_toy_world(args.out, steps=args.steps, layers=args.layers, hidden=args.hidden)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
