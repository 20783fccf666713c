"""The bundled synthetic reasoning task, its tokenizer and its tiny teacher (see each module).

- `h1rl.data.arithmetic`: multi-step arithmetic word problems with step-by-step solutions; seeded, disjoint
  train/test splits; a difficulty knob; chat formatting and jsonl files;
- `h1rl.data.tokenizer`: the byte-level BPE trained on the task and its chat template; `load_tokenizer()`;
- `h1rl.data.teacher`: the teacher's architecture and supervised training loop (`scripts/build_assets.py`).
"""

from h1rl.data.arithmetic import (
    DEFAULT_LEVEL,
    LEVELS,
    ArithmeticTask,
    Difficulty,
    make_splits,
    read_jsonl,
    split_of,
    to_chat,
    write_jsonl,
)
from h1rl.data.tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_LEVEL",
    "LEVELS",
    "ArithmeticTask",
    "Difficulty",
    "load_tokenizer",
    "make_splits",
    "read_jsonl",
    "split_of",
    "to_chat",
    "train_tokenizer",
    "write_jsonl",
]
