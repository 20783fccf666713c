r"""The bundled tokenizer: a small byte-level BPE trained locally on the arithmetic task, with its chat template.

How text is split before BPE (`PRE_TOKENIZE`): every digit is its own piece (with its leading space, if any: " 7"),
`\boxed{` is one piece, and so is each run of letters or of other symbols (with a leading space) and each run of
white space. BPE then merges within pieces only, so a number is always one token per digit (models see "1 9" for
19, never a memorised "19"), while the task's words become single tokens. Bytes are the base alphabet, so any text
encodes (no unknown token) and decoding gives back the exact text.

Chat format (`CHAT_TEMPLATE`), for system / user / assistant messages:

    <|system|>\n{system}<|end|>\n<|user|>\n{question}<|end|>\n<|assistant|>\n{reasoning}\n{answer}<|end|>

An assistant message may carry its step lines in `reasoning_content` and the boxed answer in `content`, or both in
`content` (what `h1rl.data.arithmetic.to_chat` writes). `<|end|>` is the end-of-sequence token, so a model stops
after its answer. The assistant part (and its `<|end|>`) sits inside `{% generation %}` markers, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens to train on.
`add_generation_prompt=True` ends the prompt with `<|assistant|>\n`.

`train_tokenizer(task_corpus())` builds one; `load_tokenizer()` loads the bundled one (package data,
`h1rl/assets/tokenizer`), and `load_tokenizer(path_or_hub_name)` any other: the one tokenizer loader every command
uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, EOS, *ROLE_TOKENS]  # ids 0..4, in this order
DEFAULT_VOCAB_SIZE = 512
PRE_TOKENIZE = r" ?\d| ?\\boxed\{| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}"
    "{% if message.get('reasoning_content') %}{{ message['reasoning_content'] }}\n{% endif %}"
    "{{ message['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ ': expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def task_corpus(n_per_level: int = 1000, seed: int = 0) -> list[str]:
    """Texts to train the bundled tokenizer on: questions and solutions of every difficulty level (train split), and
    the number words up to 999."""
    from h1rl.data.arithmetic import LEVELS, ArithmeticTask, number_to_words

    texts = []
    for level in LEVELS:
        for row in ArithmeticTask(level, seed).generate(n_per_level, "train"):
            texts += [row["question"], row["solution"]]
    return texts + [number_to_words(i) for i in range(1000)]


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens (special tokens included) trained on `texts`, with the chat template.

    Deterministic: the same texts give the same vocabulary and merges.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"train_tokenizer: vocab_size must be >= {len(alphabet) + len(SPECIAL_TOKENS)} (bytes and "
                         f"special tokens), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap(backend)


def wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a trained backend: special tokens, chat template, left padding."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS,
                                        additional_special_tokens=ROLE_TOKENS,
                                        padding_side="left")  # prompts are left-padded for generation
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path: str | Path | None = None, padding_side: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """The one tokenizer loader of h1rl: the bundled tokenizer (no argument), or the tokenizer of a checkpoint
    directory, a hub model, or `bundled` (the bundled teacher's). A tokenizer without a pad token gets its EOS as pad
    (neither: an error); `padding_side`, when given, is set (distillation batches are right-padded)."""
    from transformers import AutoTokenizer

    from h1rl.assets import model_path, tokenizer_dir

    where = Path(tokenizer_dir() if name_or_path is None else model_path(name_or_path))
    local = where.exists() or where.is_absolute() or str(name_or_path).startswith(".")  # else: a hub name
    if local and not ((where / "tokenizer.json").is_file() or (where / "tokenizer_config.json").is_file()):
        hint = " (build the bundled assets with `python scripts/build_assets.py`)" if name_or_path is None else ""
        raise FileNotFoundError(f"load_tokenizer: {where} has no tokenizer.json{hint}")
    tokenizer = AutoTokenizer.from_pretrained(str(where))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {where} has neither a pad nor an EOS token; add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer
