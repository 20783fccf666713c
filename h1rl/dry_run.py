r"""Dry runs: a recipe checked and planned on any machine, before a GPU is booked. No weights, no downloads.

    h1rl grpo --config grpo_apriel_h1_15b --dry-run [--gpus 16] [--prompt-len 1024]
    h1rl distill --config distill_qwen3_1p7b --dry-run [--gpus 8]
    h1rl convert --teacher Qwen/Qwen3-1.7B --layout ... --output_dir DIR --dry-run

A dry run
1. parses the recipe as the run would (an unknown or renamed key fails the same way);
2. finds the model's config (`model_config`): a checkpoint directory, a config JSON, the Hugging Face cache, or the
   copy h1rl bundles of the hub models its recipes name (`h1rl/recipes/models/<org>--<name>.json`: the config only).
   A GRPO recipe whose model is a distillation's output that does not exist yet (`<output_dir>/stage_K/final` of a
   bundled distill recipe) is planned with that stage's student. Models are built on the meta device; for a
   distillation, the student of every stage, converted from the teacher's config with Mamba-in-Llama's shapes (a
   scorer's layers are chosen at run time; the plan takes the first candidates: the shapes do not depend on which);
3. checks the data on a few rows (`sample_dataset`): the recipe's local file, or for a hub dataset the sample h1rl
   bundles in that dataset's columns and answer format (`h1rl/assets/data/samples/<org>--<name>.jsonl`, rows written
   for h1rl, not copied from the dataset): the columns, the reference answers (extracted by `h1rl.data.loading`; a
   completion `\boxed{answer}` must score 1 with the accuracy reward), the rewards the recipe names, and the chat
   template rendering each prompt or conversation: the model's own tokenizer when it is on this machine, else the
   bundled tokenizer's template as a stand-in (the plan says which);
4. prints the plan: parameters, GPUs, and the per-GPU memory of each phase under ZeRO-3, measured on fake tensors
   through the real code paths by `h1rl.bench.memory` (a training micro-batch, a rollout phase within the recipe's
   `rollout_*` budget, a distillation micro-batch; its ZeRO-3 accounting, gathered weights included), at `--gpus` or
   at the fewest GPUs (a multiple of 8) on which every phase fits on 80 GB, and the fewest on 80 GB and 141 GB.
   Token lengths: a GRPO row is `--prompt-len` (default 1024) + `max_completion_length` tokens; a distillation row
   `data.max_length`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GiB = 2**30
RESERVE_GIB = 3.0  # per GPU, outside PyTorch's tensors (h1rl bench memory's default)
SAMPLE_ROWS = 4


# ---- the model ---------------------------------------------------------------------------------------------------


def bundled_name(name: str) -> str:
    """The file stem h1rl bundles a hub repository's config or data sample under: `org/name` -> `org--name`."""
    return str(name).replace("/", "--")


def config_from_json(path: str | Path):
    """A transformers config from a config.json file (h1rl's model types included)."""
    from transformers import AutoConfig

    import h1rl  # noqa: F401  (registers the hybrid model types)

    data = json.loads(Path(path).read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def model_config(name_or_path: str):
    """(config, where it came from) of a model: a checkpoint directory, a config JSON file, `bundled`, the Hugging Face
    cache, or h1rl's bundled copy of a hub model's config. FileNotFoundError naming what was tried."""
    from transformers import AutoConfig

    import h1rl  # noqa: F401
    from h1rl.assets import model_path
    from h1rl.recipes import models_dir

    path = Path(model_path(name_or_path))
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path)), str(path)
    if path.suffix == ".json" and path.is_file():
        return config_from_json(path), str(path)
    try:
        return AutoConfig.from_pretrained(str(name_or_path), local_files_only=True), "the Hugging Face cache"
    except (OSError, ValueError):
        pass
    bundled = models_dir() / f"{bundled_name(name_or_path)}.json"
    if bundled.is_file():
        return config_from_json(bundled), f"h1rl's copy of {name_or_path}'s config ({bundled.name})"
    raise FileNotFoundError(f"{name_or_path}: no checkpoint directory, config JSON or cached hub model of that name, "
                            f"and h1rl bundles no config for it ({bundled.name} in h1rl/recipes/models)")


def parameters(config) -> int:
    """Parameters of the model of `config`, counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def stage_layouts(config, start: list[str]) -> list[list[str]]:
    """The layout after each stage of a distillation `config` from `start` (a scorer takes its first candidates)."""
    from h1rl.distill.config import check_schedule, scorer_candidates

    check_schedule(config.stages, start)
    layouts, layout = [], list(start)
    for k, stage in enumerate(config.stages):
        layers = stage.layers if stage.layers is not None else scorer_candidates(config.stages, k, layout)[
            : stage.num_layers]
        layout = ["m2" if i in layers else code for i, code in enumerate(layout)]
        layouts.append(layout)
    return layouts


def distilled_student(model_name: str):
    """(hybrid config, where it comes from, its tokenizer: the teacher's) of `<output_dir>/stage_K/final` that a
    bundled distill recipe writes, or None when no bundled recipe writes it."""
    from h1rl.config_io import load_config
    from h1rl.distill.config import DistillConfig
    from h1rl.models.convert import hybrid_config_from_teacher
    from h1rl.recipes import list_recipes

    path = Path(model_name)
    if path.name != "final" or not path.parent.name.startswith("stage_"):
        return None
    for recipe in list_recipes():
        if recipe.kind != "distill":
            continue
        config = load_config(DistillConfig, recipe.path)
        if Path(config.output_dir) != path.parent.parent:
            continue
        k = int(path.parent.name.split("_")[1])
        teacher, _ = model_config(config.model.teacher)
        layout = stage_layouts(config, ["t"] * teacher.num_hidden_layers)[k - 1]
        return (hybrid_config_from_teacher(teacher, layout, config.model.ssm_cfg),
                f"stage {k} of the bundled recipe {recipe.name} (it writes {model_name}; not there yet)",
                config.model.tokenizer or config.model.teacher)
    return None


# ---- the data ----------------------------------------------------------------------------------------------------


def sample_dataset(dataset_name: str) -> tuple[Path, str]:
    """(a local file of rows to check, what it is): the recipe's own file, or h1rl's sample of a hub dataset."""
    from h1rl.assets import samples_dir
    from h1rl.data.loading import LOCAL_FORMATS

    path = Path(dataset_name)
    if path.is_file():
        return path, f"the recipe's file {path}"
    sample = samples_dir() / f"{bundled_name(dataset_name)}.jsonl"
    if sample.is_file():
        return sample, f"h1rl's sample of {dataset_name} ({sample.name}: its columns and answer format)"
    if path.suffix in LOCAL_FORMATS:
        raise FileNotFoundError(f"dataset {dataset_name} does not exist yet; a dry run checks the data it has")
    raise FileNotFoundError(f"hub dataset {dataset_name}: h1rl bundles no sample of it ({sample.name} in "
                            "h1rl/assets/data/samples); download a few rows to a local file and give its path")


def template_tokenizer(name_or_path: str):
    """(tokenizer, note): the model's own when it is on this machine (directory or cache), else the bundled one."""
    from transformers import AutoTokenizer

    from h1rl.assets import model_path
    from h1rl.data.tokenizer import load_tokenizer

    path = Path(model_path(name_or_path))
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return load_tokenizer(path), f"{name_or_path}'s own"
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True), f"{name_or_path}'s own (cache)"
    except (OSError, ValueError):
        return load_tokenizer(), (f"a stand-in: the bundled tokenizer's template ({name_or_path}'s own is not on this "
                                  "machine; token counts are the stand-in's)")


def check_problems(script, tokenizer, reward_funcs: list) -> dict[str, Any]:
    """GRPO data on a few rows: columns, extracted answers that verify, prompts rendered by the chat template."""
    from h1rl.data.loading import load_problems

    source, what = sample_dataset(script.dataset_name)
    rows = load_problems(str(source), prompt_column=script.prompt_column, answer_column=script.answer_column,
                         answer_format=script.answer_format, system_prompt=script.system_prompt, chat=script.chat,
                         max_samples=SAMPLE_ROWS, where=f"dataset_name (checked on {source.name})")
    rows = [dict(r) for r in rows]
    answers = [r[script.answer_column] for r in rows]
    rendered = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                if isinstance(r["prompt"], list) else r["prompt"] for r in rows]
    tokens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered]
    for func in reward_funcs:
        if getattr(func, "answer_column", None) == script.answer_column:  # the accuracy reward
            scores = func(completions=[f"\\boxed{{{a}}}" for a in answers], **{script.answer_column: answers})
            bad = [(a, s) for a, s in zip(answers, scores) if s != 1.0]
            if bad:
                raise ValueError(f"{source.name}: reference answers that do not verify against themselves: {bad}")
    return {"data": what, "rows": len(rows), "answers": answers, "prompt_tokens": tokens, "first_prompt": rendered[0]}


def check_conversations(data, tokenizer) -> dict[str, Any]:
    """Distillation data on a few rows: rendered and tokenized as `h1rl distill` does, with loss targets."""
    import dataclasses

    from h1rl.distill.data import build_dataset

    source, what = sample_dataset(data.dataset_name)
    config = dataclasses.replace(data, dataset_name=str(source))
    rows = build_dataset(str(source), tokenizer, config, SAMPLE_ROWS)
    targets = [sum(label != -100 for label in r["labels"]) for r in rows]
    if not all(targets):
        raise ValueError(f"{source.name}: rows without loss targets: {targets}")
    return {"data": what, "rows": len(rows), "tokens": [len(r["input_ids"]) for r in rows], "targets": targets}


# ---- memory ------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    what: str
    lines: list[str] = field(default_factory=list)
    phases: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)  # phase -> bench.memory rows at N
    gpus: int | None = None
    fewest: dict[str, int | None] = field(default_factory=dict)  # GPU size -> fewest GPUs for every phase
    fits: list[str] = field(default_factory=list)  # a line per GPU size
    seconds: float = 0.0

    def totals(self) -> dict[str, float]:
        return {phase: rows[-1][2] / GiB for phase, rows in self.phases.items()}

    def text(self) -> str:
        out = [f"dry run: {self.what}", *self.lines]
        if self.phases:
            out.append(f"memory per GPU under ZeRO-3 at {self.gpus} GPUs (GiB; measured on fake tensors, "
                       "h1rl.bench.memory):")
            items = [item for item, _, _ in next(iter(self.phases.values()))]
            for rows in self.phases.values():
                items += [item for item, _, _ in rows if item not in items]
            width = max(map(len, items)) + 2
            out.append(" " * (width + 2) + "".join(f"{phase:>14}" for phase in self.phases))
            for item in items:
                cells = [next((f"{b / GiB:.2f}" for i, _, b in rows if i == item), "-")
                         for rows in self.phases.values()]
                out.append(f"  {item:<{width}}" + "".join(f"{c:>14}" for c in cells))
            out += self.fits
            fewest = ", ".join(f"{n or '> 512'} on {size}" for size, n in self.fewest.items())
            out.append(f"fewest GPUs (a multiple of 8) for every phase: {fewest}")
        out.append(f"({self.seconds:.0f} s; no weights loaded, nothing downloaded)")
        return "\n".join(out)


def zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a path, a bundled name or a dict), or None."""
    from h1rl.distributed import deepspeed_config_path

    if deepspeed is None:
        return None
    if isinstance(deepspeed, dict):
        return deepspeed.get("zero_optimization", {}).get("stage")
    text = str(deepspeed)
    data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(deepspeed_config_path(text))
                                                                            .read_text())
    return data.get("zero_optimization", {}).get("stage")


def memory(plan: Plan, measured: dict, sizes, gpus: int | None, gather: bool = True) -> None:
    """Fill `plan` with the ZeRO-3 rows of each measured phase at `gpus` (default: the fewest that fit 80 GB)."""
    from h1rl.bench.memory import GPU_SIZES, fewest_gpus, phase_rows, usable

    def fits(n: int, size: int) -> bool:
        room = usable(size, RESERVE_GIB)
        return all(phase_rows(phase, sizes, n, m, gather)[-1][2] <= room for phase, m in measured.items())

    plan.fewest = {name: fewest_gpus(lambda n, size=size: fits(n, size)) for name, size in GPU_SIZES.items()}
    plan.gpus = gpus or plan.fewest["80 GB"] or 8
    plan.phases = {phase: phase_rows(phase, sizes, plan.gpus, m, gather) for phase, m in measured.items()}
    for name, size in GPU_SIZES.items():
        room = usable(size, RESERVE_GIB) / GiB
        verdict = ", ".join(f"{p} {t:.1f}" for p, t in plan.totals().items())
        ok = all(t <= room for t in plan.totals().values())
        plan.fits.append(f"{name} GPUs ({room:.1f} GiB usable): {verdict} GiB per GPU at {plan.gpus} GPUs: "
                         f"{'fits' if ok else 'does not fit'}")


def _fake_mode():
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from h1rl.bench.memory import fused_kernels_counted

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
    calls = stack.enter_context(fused_kernels_counted())
    return stack, calls


# ---- the commands --------------------------------------------------------------------------------------------------


def grpo_plan(args, reward_funcs: list, gpus: int | None = None, prompt_len: int = 1024) -> Plan:
    """The dry run of a parsed `h1rl grpo` recipe (`h1rl.rl.config.GRPOArgs`) and the rewards it names
    (`h1rl.rl.run.build_rewards`; closed here)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from h1rl.bench.memory import ModelSizes, measure_rollout, measure_training, models_from_configs
    from h1rl.rollout.engine import RolloutBudget

    start = time.perf_counter()
    script, training, model_args = args.script, args.training, args.model
    unset_hf_deepspeed_config()  # parsing a ZeRO-3 config armed zero.Init for every model built next: not here
    name = model_args.model_name_or_path
    found = None if Path(name).exists() else distilled_student(name)
    config, source = found[:2] if found is not None else model_config(name)
    if not hasattr(config, "hybrid_block_layout"):
        raise ValueError(f"model_name_or_path {name} is a {config.model_type} model, not a hybrid: convert it first "
                         "(h1rl convert, or h1rl distill)")
    plan = Plan(f"h1rl grpo, {config.model_type} from {source}")
    layout = list(config.hybrid_block_layout)
    plan.lines.append(f"model: {parameters(config) / 1e9:.2f}B parameters, {len(layout)} layers "
                      f"({layout.count('m2')} m2, {layout.count('t')} attention), hidden {config.hidden_size}, "
                      f"vocabulary {config.vocab_size}")
    tokenizer, note = template_tokenizer(found[2] if found is not None else name)
    try:
        data = check_problems(script, tokenizer, reward_funcs)
    finally:
        for func in reward_funcs:
            if hasattr(func, "close"):
                func.close()
    plan.lines += [f"data: {data['data']}: {data['rows']} rows; answers {data['answers']}; prompts of "
                   f"{data['prompt_tokens']} tokens, chat template: {note}",
                   f"  first prompt as rendered: {data['first_prompt']!r}",
                   f"rewards: {', '.join(script.reward_funcs)}; the reference answers score 1 against themselves"]
    rows = training.per_device_train_batch_size * training.steps_per_generation
    T = prompt_len + training.max_completion_length
    budget = RolloutBudget(max_rows=training.rollout_max_rows, memory_gb=training.rollout_memory_gb,
                           prefill_chunk=training.rollout_prefill_chunk)
    plan.lines.append(f"batch: {training.per_device_train_batch_size} rows per GPU per micro-batch, "
                      f"{training.steps_per_generation} micro-batches per rollout ({rows} rows = "
                      f"{rows // training.num_generations} prompts x G={training.num_generations} per GPU), rows of "
                      f"{prompt_len} prompt + "
                      f"{training.max_completion_length} completion tokens; rollout budget max_rows "
                      f"{budget.max_rows}, memory_gb {budget.memory_gb}, prefill_chunk {budget.prefill_chunk}")
    stage = zero_stage(training.deepspeed)
    if stage != 3:
        plan.lines.append(f"note: the recipe runs with ZeRO stage {stage}; the memory below is ZeRO-3's")
    stack, calls = _fake_mode()
    with stack:
        student, _ = models_from_configs(config, None, bool(training.gradient_checkpointing))
        sizes = ModelSizes.of(student, student)
        measured = {"training": measure_training(student, T, prompt_len, training.per_device_train_batch_size, calls),
                    "rollout": measure_rollout(student, T, prompt_len, training.num_generations, rows, budget, calls)}
    plan.lines.append(f"rollout: {measured['rollout'].extra['slots']} rows decoded at once")
    memory(plan, measured, sizes, gpus, gather=bool(training.ds3_gather_for_generation))
    plan.seconds = time.perf_counter() - start
    return plan


def distill_plan(config, gpus: int | None = None) -> Plan:
    """The dry run of an `h1rl distill` recipe (`DistillConfig`)."""
    from h1rl.bench.memory import ModelSizes, measure_distill, models_from_configs
    from h1rl.models.convert import hybrid_config_from_teacher

    start = time.perf_counter()
    teacher, source = model_config(config.model.teacher)
    plan = Plan(f"h1rl distill, teacher {config.model.teacher} ({teacher.model_type}, from {source})")
    plan.lines.append(f"teacher: {parameters(teacher) / 1e9:.2f}B parameters, {teacher.num_hidden_layers} layers")
    begin = (list(model_config(config.model.student)[0].hybrid_block_layout) if config.model.student
             else ["t"] * teacher.num_hidden_layers)
    layouts = stage_layouts(config, begin)
    students = [hybrid_config_from_teacher(teacher, layout, config.model.ssm_cfg) for layout in layouts]
    for k, (stage, layout, student) in enumerate(zip(config.stages, layouts, students), 1):
        how = f"{stage.num_layers} by {stage.scorer}" if stage.scorer else f"layers {stage.layers}"
        plan.lines.append(f"stage {k}: swap {how}, {stage.max_steps} steps -> {layout.count('m2')} m2 + "
                          f"{layout.count('t')} attention, {parameters(student) / 1e9:.2f}B parameters")
    tokenizer, note = template_tokenizer(config.model.tokenizer or config.model.teacher)
    tokenizer.padding_side = "right"
    data = check_conversations(config.data, tokenizer)
    plan.lines.append(f"data: {data['data']}: {data['rows']} rows of {data['tokens']} tokens, loss on "
                      f"{data['targets']}; chat template: {note}")
    stage = zero_stage(config.training.deepspeed)
    if stage != 3:
        plan.lines.append(f"note: the recipe runs with ZeRO stage {stage}; the memory below is ZeRO-3's")
    B, T = config.training.per_device_train_batch_size, config.data.max_length
    plan.lines.append(f"batch: {B} rows x {T} tokens per GPU per micro-batch, x "
                      f"{config.training.gradient_accumulation_steps} accumulated")
    stack, calls = _fake_mode()
    with stack:
        student, teacher_model = models_from_configs(students[0], teacher, config.training.activation_checkpointing)
        sizes = ModelSizes.of(student, teacher_model)
        measured = {"distillation": measure_distill(student, teacher_model, B, T, calls, config.loss)}
    memory(plan, measured, sizes, gpus)
    plan.seconds = time.perf_counter() - start
    return plan


def convert_plan(teacher_name: str, layout: str, ssm_cfg: dict | None = None) -> Plan:
    """The dry run of `h1rl convert`: the hybrid's config and size from the teacher's config."""
    from h1rl.models.convert import hybrid_config_from_teacher

    teacher, source = model_config(teacher_name)
    hybrid = hybrid_config_from_teacher(teacher, layout, ssm_cfg)
    codes = list(hybrid.hybrid_block_layout)
    plan = Plan(f"h1rl convert, teacher {teacher_name} ({teacher.model_type}, from {source})")
    plan.lines += [f"teacher: {parameters(teacher) / 1e9:.3f}B parameters, {teacher.num_hidden_layers} layers",
                   f"hybrid: {parameters(hybrid) / 1e9:.3f}B parameters, {codes.count('m2')} m2 + {codes.count('t')} "
                   f"attention + {codes.count('i')} identity; ssm_cfg {hybrid.ssm_cfg}"]
    return plan


def pop_flags(argv: list[str]) -> tuple[bool, dict[str, int], list[str]]:
    """(`--dry-run` given, its options `--gpus N` / `--prompt-len N`, the other arguments)."""
    rest, options, dry, args = [], {}, False, list(argv)
    while args:
        arg = args.pop(0)
        key = arg.split("=", 1)[0]
        if arg == "--dry-run":
            dry = True
        elif key in ("--gpus", "--prompt-len"):
            value = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{key} needs a positive number, got {value!r}")
            options[key[2:].replace("-", "_")] = int(value)
        else:
            rest.append(arg)
    if options and not dry:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in options)}: options of --dry-run")
    return dry, options, rest
