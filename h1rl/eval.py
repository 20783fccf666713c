r"""`h1rl eval`: accuracy and pass@k of a checkpoint on a math dataset, scored by math-verify.

    h1rl eval --model DIR|HUB_NAME|bundled [--dataset_name FILE_OR_HUB_NAME] [--num_samples 8 --temperature 1.0]
              [--out eval.json] [--traces traces.jsonl]          (--help: every key)

Writes the summary to `--out` and one JSON line per sample (problem, completion, correct, finish reason) beside it
(`eval.details.jsonl`); `read_results` joins the two.

Works for any checkpoint h1rl loads: hybrids (and Apriel-H1 checkpoints) generate with the rollout engine
(`h1rl.rollout.RolloutEngine`: prefill once, fast recurrent decode), other causal LMs (the plain transformer
teachers) with `model.generate`. The default data is the bundled test split (`h1rl/assets/data/test.jsonl`), on
which the bundled teacher was measured.

What is measured, per problem, from n completions (`num_samples`):
- the problems are read by `h1rl.data.loading` (the loader of `h1rl grpo` and `h1rl distill` too): the
  `prompt_column`, and the reference answer extracted from `answer_column` per `answer_format` (GSM8K's `#### N`,
  MATH's `\boxed{}`, or the answer itself);
- each completion is the model's reply to the question as a chat prompt (the tokenizer's chat template, with
  `add_generation_prompt`; plain question text when `chat=False`), decoded without special tokens and scored by
  `h1rl.rewards.accuracy_reward` against the reference answer (the completion's last `\boxed{}` answer, checked by
  math-verify in killable worker processes);
- `accuracy`: the mean score over all completions: greedy accuracy when temperature is 0 (then n must be 1), else
  the sampled accuracy, an unbiased estimate of pass@1;
- `pass@k` for each k in `pass_k` (<= n): the unbiased estimator of Chen et al. 2021 (Codex),
  1 - C(n - c, k) / C(n, k) per problem with c correct completions, averaged; pass@1 equals `accuracy`, and
  pass@k never decreases with k.
Also reported: the share of completions with no `\boxed{}` answer (`no_answer`) and of those cut at
`max_completion_length` (`truncated`), the mean completion length in tokens, the checker's counters (timeouts,
crashes, errors are failures of the checker, not of the model), and every completion with its score, so a number in
the table can be traced to the texts behind it.

`evaluate(model, dataset, tokenizer=None, **settings)` returns that as a dict; `main(argv)` is the command line:
it prints a table (`format_table`) and writes the dict as JSON.

The same run gives distillation data: `trace_rows(results)` (`--traces FILE`) turns the completions into chat rows
for `h1rl distill`, by default only those math-verify scored correct (the teacher's verified reasoning traces:
Apriel-H1 distilled on its teacher's traces).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from h1rl.data.loading import ANSWER_FORMATS, prompt_text

logger = logging.getLogger(__name__)

@dataclass
class EvalConfig:
    """How to evaluate: `evaluate(..., **fields)`, `h1rl eval --key value` and the demo's `eval` sections map onto these
    fields (the data's names are those of `h1rl grpo`: TRL's where it has one)."""

    RENAMED: ClassVar[dict[str, str]] = {"question_column": "prompt_column", "max_new_tokens": "max_completion_length",
                                         "split": "dataset_test_split"}

    num_samples: int = field(default=1, metadata={"help": "Completions per problem (n). Default 1.", "aliases": ["-n"]})
    temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature; 0 is greedy. Default none: 0 when num_samples is 1, "
                                        "else 1.0."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling's p. Default 1.0 (off)."})
    pass_k: list[int] = field(
        default_factory=list, metadata={"help": "The k of pass@k (each <= num_samples). Default: 1 and num_samples."})
    max_completion_length: int = field(
        default=128, metadata={"help": "Most tokens generated per completion (TRL's name). Default 128."})
    batch_size: int = field(
        default=64, metadata={"help": "Problems per generation batch (rows: batch_size x num_samples). Default 64."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (batch i samples with seed + i). Default 0."})
    dataset_config: str | None = field(
        default=None, metadata={"help": "A hub dataset's configuration name (TRL's dataset_config). Default none."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "The split of a hub dataset to evaluate on (TRL's dataset_test_split); a "
                                          "local file has one. Default test."})
    prompt_column: str = field(
        default="question", metadata={"help": "Column holding the problem: text, or a list of chat messages. Default "
                                              "question (the bundled test split's)."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the reference answer. Default "
                                                                   "answer."})
    answer_format: str = field(
        default="auto", metadata={"help": "How the reference answer is read from answer_column: gsm8k ('#### N'), "
                                          "boxed (the last \\boxed{...}), plain, or auto. Default auto "
                                          "(h1rl.data.loading).", "choices": list(ANSWER_FORMATS)})
    system_prompt: str | None = field(
        default=None, metadata={"help": "Prepended as a system message (chat prompts only). Default none."})
    chat: bool = field(
        default=True, metadata={"help": "Format prompts with the tokenizer's chat template (with the generation "
                                        "prompt); --no_chat prompts with the plain question. Default true."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N problems. Default all."})

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature is None:
            self.temperature = 0.0 if self.num_samples == 1 else 1.0
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError(f"temperature 0 (greedy) gives {self.num_samples} identical completions; set "
                             "num_samples=1 or a temperature > 0")
        if not self.pass_k:
            self.pass_k = sorted({1, self.num_samples})
        bad = [k for k in self.pass_k if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(f"pass_k values must be in 1..num_samples ({self.num_samples}), got {bad}")
        self.pass_k = sorted(set(self.pass_k))
        for name in ("max_completion_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 (or None for all), got {self.max_samples}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format: expected one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_problems(dataset: Any, config: EvalConfig) -> tuple[list[dict[str, Any]], str]:
    """(rows with a `prompt` and the extracted reference answer, a name for the report) from a local file, a hub name,
    or rows (`h1rl.data.loading.load_problems`)."""
    from h1rl.data.loading import load_problems as load

    name = str(dataset) if isinstance(dataset, (str, Path)) else f"<{type(dataset).__name__} of {len(dataset)} rows>"
    rows = load(dataset, prompt_column=config.prompt_column, answer_column=config.answer_column,
                answer_format=config.answer_format, system_prompt=config.system_prompt, chat=config.chat,
                split=config.dataset_test_split, dataset_config=config.dataset_config,
                max_samples=config.max_samples, where="eval data")
    return [dict(row) for row in rows], name


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a checkpoint directory (any h1rl hybrid, Apriel-H1 checkpoint or transformers LM), a hub
    name, or `bundled` (the bundled tiny teacher)."""
    from transformers import AutoModelForCausalLM

    import h1rl  # noqa: F401  (registers the hybrid Auto classes)
    from h1rl.assets import model_path
    from h1rl.data.tokenizer import load_tokenizer

    path = model_path(name_or_path)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"eval model: {path} has no config.json (expected a checkpoint directory)")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.eval(), tokenizer


def encode_prompts(rows: list[dict[str, Any]], tokenizer, config: EvalConfig) -> list[list[int]]:
    """Token ids of each row's `prompt`: chat messages through the chat template with the generation prompt, text as
    it is."""
    if config.chat and not tokenizer.chat_template:
        raise ValueError("eval: the tokenizer has no chat template; pass chat=False (--no_chat) to prompt with the "
                         "plain question text")
    prompts = []
    for row in rows:
        if isinstance(row["prompt"], list):
            ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer(row["prompt"])["input_ids"]
        prompts.append(list(ids))
    return prompts


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's generation_config EOS ids."""
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("eval: neither the tokenizer nor the model's generation_config has an EOS token; "
                         "completions would never stop")
    return sorted(ids)


def generate(model, prompts: list[list[int]], config: EvalConfig, stop_ids: list[int], pad_id: int, seed: int
             ) -> tuple[list[list[int]], list[str]]:
    """n completions per prompt (prompt-major) and each one's finish reason ("stop" or "length")."""
    from h1rl.models.modeling import HybridForCausalLM

    n = config.num_samples
    if isinstance(model, HybridForCausalLM):
        from h1rl.rollout import RolloutEngine, SamplingParams

        params = SamplingParams(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                                top_p=config.top_p, stop_token_ids=stop_ids, seed=seed)
        rollout = RolloutEngine(model, pad_token_id=pad_id).generate(prompts, n, params)
        return rollout.completions(), rollout.finish_reasons

    from transformers import GenerationConfig

    device = next(model.parameters()).device
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T) left-padded
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p) :] = torch.tensor(p)
        mask[r, T - len(p) :] = 1
    sample = config.temperature > 0
    gen_config = GenerationConfig(
        max_new_tokens=config.max_completion_length, do_sample=sample, num_return_sequences=n,
        temperature=config.temperature if sample else None, top_p=config.top_p if sample else None, top_k=None,
        eos_token_id=stop_ids, pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config)
    completions, reasons = [], []
    for row in out[:, T:].tolist():
        cut = next((j for j, tok in enumerate(row) if tok in stop_ids), None)
        completions.append(row if cut is None else row[: cut + 1])
        reasons.append("length" if cut is None else "stop")
    return completions, reasons


@torch.no_grad()
def evaluate(model, dataset, tokenizer=None, config: EvalConfig | None = None, reward=None, **settings
             ) -> dict[str, Any]:
    """Evaluate `model` (a checkpoint directory or a loaded model with `tokenizer`) on `dataset` (a local file, a
    hub dataset name, or a list of rows); returns the results dict (see the module docstring).

    Settings are `EvalConfig` fields, given as `config` or as keywords (`num_samples=8, temperature=1.0`).
    `reward`: a callable scoring `reward(completions=texts, answer=references)` -> 1.0 per correct completion, like
    `h1rl.rewards.accuracy_reward()` (the default: a fresh one, closed afterwards; one passed in is left open).

    >>> results = evaluate("runs/hybrid", "h1rl/assets/data/test.jsonl", num_samples=4)  # doctest: +SKIP
    >>> results["accuracy"], results["pass@4"]  # doctest: +SKIP
    """
    if config is not None and settings:
        raise TypeError(f"evaluate: pass settings either as config or as keywords, not both ({sorted(settings)})")
    config = config if config is not None else EvalConfig(**settings)
    model_name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    elif tokenizer is None:
        raise ValueError("evaluate: a loaded model needs its tokenizer (tokenizer=...)")
    rows, data_name = load_problems(dataset, config)
    prompts = encode_prompts(rows, tokenizer, config)
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training = model.training
    model.eval()

    start = time.perf_counter()
    completions: list[list[int]] = []
    reasons: list[str] = []
    batches = range(0, len(prompts), config.batch_size)
    for b in tqdm(batches, desc=f"eval: {len(rows)} problems x {config.num_samples}", unit="batch",
                  disable=len(batches) < 2):
        ids, why = generate(model, prompts[b : b + config.batch_size], config, stop_ids, pad_id,
                            seed=config.seed + b // config.batch_size)
        completions += ids
        reasons += why
    generate_s = time.perf_counter() - start
    model.train(was_training)

    n = config.num_samples
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    golds = [row[config.answer_column] for row in rows for _ in range(n)]
    from h1rl.rewards import accuracy_reward

    scorer = reward if reward is not None else accuracy_reward(answer_column="answer")
    try:
        before = scorer.stats() if hasattr(scorer, "stats") else None
        scores = scorer(completions=texts, answer=golds)
        after = scorer.stats() if hasattr(scorer, "stats") else None
    finally:
        if reward is None:
            scorer.close()
    checker = {k: after[k] - before.get(k, 0) for k in after} if after is not None else {}
    correct = [s == 1.0 for s in scores]

    problems, per_k = [], {k: 0.0 for k in config.pass_k}
    for i, row in enumerate(rows):
        hits = correct[i * n : (i + 1) * n]
        c = sum(hits)
        for k in config.pass_k:
            per_k[k] += pass_at_k(n, c, k)
        problems.append({
            "index": i, "question": prompt_text(row["prompt"]), "answer": row[config.answer_column],
            "num_correct": c, "completions": texts[i * n : (i + 1) * n], "correct": hits,
            "finish_reasons": reasons[i * n : (i + 1) * n],
        })
    total = len(texts)
    results: dict[str, Any] = {
        "model": model_name,
        "data": data_name,
        "num_problems": len(rows),
        "num_samples": n,
        "temperature": config.temperature,
        "accuracy": sum(correct) / total,
        **{f"pass@{k}": v / len(rows) for k, v in per_k.items()},
        "no_answer": sum(1 for t in texts if "\\boxed{" not in t) / total,
        "truncated": reasons.count("length") / total,
        "mean_completion_tokens": sum(len(c) for c in completions) / total,
        "generate_seconds": generate_s,
        "checker": checker,
        "config": asdict(config),
        "problems": problems,
    }
    failed = sum(checker.get(k, 0) for k in ("timeouts", "crashes", "errors"))
    if failed:
        logger.warning("eval: %d of %d checks failed in the checker (scored 0); see results['checker']", failed, total)
    return results


def trace_rows(results: dict[str, Any], only_correct: bool = True) -> list[dict[str, Any]]:
    """An evaluation's completions as distillation rows `{"messages": [system?, user, assistant]}`.

    `only_correct`: keep the completions scored correct (rejection sampling on the verifier). Identical completions
    of one problem are kept once, empty ones never. The system prompt is the evaluation's (`config.system_prompt`).
    """
    from h1rl.data import to_chat

    system = results["config"].get("system_prompt")
    rows = []
    for problem in results["problems"]:
        kept = set()
        for text, ok in zip(problem["completions"], problem["correct"]):
            if (ok or not only_correct) and text and text not in kept:  # an empty completion teaches nothing
                kept.add(text)
                rows.append({"messages": to_chat({"question": problem["question"], "solution": text}, system)})
    return rows


SUMMARY_KEYS = ("accuracy", "no_answer", "truncated", "mean_completion_tokens")


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A text table, one row per named result: problems, samples, temperature, accuracy, pass@k, ...

    >>> print(format_table({"teacher": {"num_problems": 2, "num_samples": 1, "temperature": 0.0, "accuracy": 0.5,
    ...                                 "pass@1": 0.5, "no_answer": 0.0, "truncated": 0.0,
    ...                                 "mean_completion_tokens": 12.0}}))
    model    problems  samples  temp  accuracy  pass@1  no_answer  truncated  tokens
    teacher         2        1   0.0     0.500   0.500      0.000      0.000    12.0
    """
    ks = sorted({int(key[5:]) for r in results.values() for key in r if key.startswith("pass@")})
    header = ["model", "problems", "samples", "temp", "accuracy", *[f"pass@{k}" for k in ks], "no_answer",
              "truncated", "tokens"]
    lines = []
    for name, r in results.items():
        cells = [name, str(r["num_problems"]), str(r["num_samples"]), f"{r['temperature']:.1f}",
                 f"{r['accuracy']:.3f}"]
        cells += [f"{r[f'pass@{k}']:.3f}" if f"pass@{k}" in r else "-" for k in ks]
        cells += [f"{r['no_answer']:.3f}", f"{r['truncated']:.3f}", f"{r['mean_completion_tokens']:.1f}"]
        lines.append(cells)
    widths = [max(len(row[j]) for row in [header, *lines]) for j in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join(fmt(row) for row in [header, *lines])


def details_path(path: str | Path) -> Path:
    """Where the per-sample details of results written to `path` go: eval.json -> eval.details.jsonl."""
    path = Path(path)
    return path.with_name(path.stem + ".details.jsonl")


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """The summary (every key but "problems") as JSON to `path`, and one JSON line per sample (problem, sample,
    question, answer, completion, correct, finish_reason) to `details_path(path)`; `read_results` joins them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in results.items() if k != "problems"}
    summary["details"] = details_path(path).name
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    with details_path(path).open("w") as f:
        for p in results["problems"]:
            for j, (text, hit, reason) in enumerate(zip(p["completions"], p["correct"], p["finish_reasons"])):
                f.write(json.dumps({"problem": p["index"], "sample": j, "question": p["question"],
                                    "answer": p["answer"], "completion": text, "correct": hit,
                                    "finish_reason": reason}, ensure_ascii=False) + "\n")
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """Results written by `write_results`, with "problems" rebuilt from the details file as `evaluate` returns them."""
    path = Path(path)
    results = json.loads(path.read_text())
    details = path.with_name(results.pop("details", details_path(path).name))
    problems: dict[int, dict[str, Any]] = {}
    for line in details.read_text().splitlines():
        row = json.loads(line)
        p = problems.setdefault(row["problem"], {"index": row["problem"], "question": row["question"],
                                                 "answer": row["answer"], "num_correct": 0, "completions": [],
                                                 "correct": [], "finish_reasons": []})
        p["completions"].append(row["completion"])
        p["correct"].append(row["correct"])
        p["finish_reasons"].append(row["finish_reason"])
        p["num_correct"] += int(row["correct"])
    results["problems"] = [problems[i] for i in sorted(problems)]
    return results


@dataclass
class EvalArguments:
    """What `h1rl eval` evaluates and where its results go (the settings are `EvalConfig`'s)."""

    RENAMED: ClassVar[dict[str, str]] = {"data": "dataset_name"}

    model: str = field(metadata={"help": "Required. A checkpoint directory (hybrid, Apriel-H1 or transformers LM), a "
                                         "hub model name, or `bundled` (the bundled tiny teacher)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A local .json / .jsonl / .parquet / .csv file or a hub dataset name (TRL's "
                                        "dataset_name). Default: the bundled test split."})
    out: str = field(default="eval.json", metadata={"help": "JSON file for the summary. Default eval.json; the "
                                                            "per-sample details go beside it (eval.details.jsonl)."})
    traces: str | None = field(
        default=None, metadata={"help": "Also write the correct completions as chat rows for `h1rl distill` (a .jsonl "
                                        "file). Default none."})
    traces_all: bool = field(default=False, metadata={"help": "With --traces: keep the wrong completions too."})
    log_level: str = field(
        default="passive", metadata={"help": "passive (default): h1rl's progress at info, transformers as it is; "
                                             "other levels set both."})


def parse_eval_args(argv: list[str] | None = None) -> tuple[EvalArguments, EvalConfig]:
    """`h1rl eval`'s arguments: `--key value` for the keys of `EvalArguments` and `EvalConfig` (`--config FILE`
    reads them from YAML); ConfigError for an unknown or renamed key."""
    from h1rl.config_io import ConfigError
    from h1rl.flags import parse_flat
    from h1rl.log import LOG_LEVELS

    (args, config), _ = parse_flat((EvalArguments, EvalConfig), argv or [], prog="h1rl eval", kind="eval",
                                   description="accuracy and pass@k of a checkpoint on a math dataset, scored by "
                                               "math-verify: --key value for any key below")
    if args.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    if args.traces_all and not args.traces:
        raise ConfigError("--traces_all needs --traces FILE")
    return args, config


def main(argv: list[str] | None = None) -> int:
    """`h1rl eval --model M [--dataset_name D] [--key value ...]`; returns the exit status (2 for a bad option)."""
    import sys

    from h1rl.assets import held_out_path
    from h1rl.config_io import ConfigError
    from h1rl.log import setup_logging

    try:
        args, config = parse_eval_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"h1rl eval: error: {err}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    results = evaluate(args.model, args.dataset_name or str(held_out_path()), config=config)
    print(format_table({Path(args.model).name or args.model: results}))
    if results["checker"].get("timeouts") or results["checker"].get("crashes") or results["checker"].get("errors"):
        print(f"checker failures (scored 0): {results['checker']}")
    print(f"results written to {write_results(results, args.out)}, per-sample details to {details_path(args.out)}")
    if args.traces:
        from h1rl.data import write_jsonl

        rows = trace_rows(results, only_correct=not args.traces_all)
        which = "completions" if args.traces_all else "correct completions"
        print(f"{len(rows)} {which} of {results['num_problems']} problems written as chat rows to "
              f"{write_jsonl(rows, args.traces)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
