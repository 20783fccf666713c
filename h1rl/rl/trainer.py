"""`HybridGRPOTrainer`: TRL's GRPOTrainer with rollouts from h1rl's recurrent engine.

Everything about the algorithm stays TRL's (`GRPOConfig`, loss types, KL and reference model, reward contract,
logging, PEFT, accelerate and DeepSpeed integration). What h1rl changes goes through the five private TRL methods
of `TRL_HOOKS`, the one list of them; `tests/rl/test_trl_hooks.py` checks their signatures, and the TRL attributes
this file reads (`TRL_STATE`), against the installed TRL, which is why `pyproject.toml` pins `trl>=1.16,<1.17`:

- `_generate_single_turn`: the distinct prompts of the batch (TRL repeats each `num_generations` times in a row)
  are sampled by `h1rl.rollout.RolloutEngine` within `rollout_budget`, each prefilled once; under ZeRO-3 the
  weights are gathered once for the whole rollout (TRL's `unwrap_model_for_generation`), or left partitioned with
  every process's model calls kept in step; the engine's per-token log-probs go back to TRL as the sampling ones.
- `_generate_and_score_completions`: after TRL's scoring, dynamic sampling (`h1rl.rl.dynamic_sampling`), then the
  importance-sampling correction (below).
- `_calculate_rewards`: TRL's, remembered for dynamic sampling's tie test.
- `_compute_loss`: rows with zero advantage left out where that is exact (`h1rl.rl.row_skipping`); the
  importance-sampling ratio handed to TRL's loss.
- `_get_per_token_logps_and_entropies`: when TRL asks for the old policy's log-probs (generation and optimisation
  steps misaligned) and the correction is off, the engine's are served: the same numbers (1e-4 in float32,
  `tests/rollout/test_engine.py`) without one more forward. Every other call runs TRL's forward over rows grouped by
  length, each prompt once (`h1rl.rl.training_pass`).

Why not TRL's public `rollout_func`: it is marked experimental, receives un-tokenised prompts (so chat templating
would have to be redone here), and its log-probs are only used with vLLM. The hooks above keep TRL's tokenisation,
tool and logging code paths intact.

The sampler/trainer mismatch correction: TRL runs its truncated importance sampling only with vLLM; the engine plays
vLLM's role. With `importance_sampling_correction` on (None, the default: on unless the policy runs in float32, where
rollout and training log-probs agree to 1e-5; bfloat16 kernels do not), the ratio pi_old / pi_engine is TRL's,
capped by its `vllm_importance_sampling_mode` / `_clip_max` / `_clip_min` (`h1rl.rl.importance`), with TRL's
`sampling/*` metrics. Where the old policy's log-probs come from: TRL's own recomputation when it ran one (the
batch is trained after an optimizer update); otherwise the batch is trained before any update, the old policy is the
one being trained, and the ratio comes from each micro-batch's training forward (its log-probs, detached; TRL's
convention for the old log-probs in that case), filled in inside `_compute_loss` before TRL reads it. TRL under vLLM
runs a separate no-grad forward of the whole batch there instead: a forward per step saved (measured: 44 s of a
160 s CPU step at a 1k cap). The engine's log-probs are never served as old ones while the correction is on.
TRL's `_compute_loss` multiplies the per-token loss by the ratio only under `use_vllm` ("vespo" folds it into its
weights regardless): the flag is raised for the duration of TRL's `_compute_loss` alone, where it gates nothing
else in TRL 1.16 (`tests/rl/test_importance.py` checks that the loss and gradient scale with the ratio).

`share_prompt_prefix` (None: on on CPU, off on CUDA): see `h1rl.rl.training_pass` and docs/grpo.md. On CUDA the
shared prompt's continuation needs a key mask, which the memory-efficient kernel keeps as a (T, S) bias per
attention layer for the backward (128 MiB per row and layer at 8k tokens), while the plain training forward runs
left-aligned on the flash kernel; under gradient checkpointing (the setting at scale) sharing is not taken anyway.

The rollout engine runs within `rollout_budget` (`h1rl.rollout.RolloutBudget`: rows decoded at once, memory, prefill
chunk; by default 90% of the free CUDA memory after TRL gathered the weights). With `ds3_gather_for_generation:
false` the weights stay partitioned during the rollout and the engine keeps every process's model calls in step
(synced decoding); m2 mixers register the parameters they read outside their own modules with DeepSpeed.

Rollouts are seeded from (`args.seed`, global step, rollouts so far at that step), so a resumed run draws the same
completions as an uninterrupted one; each process samples its own rows of that step's global stream, so a run on N
processes draws the same completions as one process holding the whole global batch.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models.utils import unwrap_model_for_generation

from h1rl.models.mamba import MambaMixer
from h1rl.rewards import checked
from h1rl.rl.dynamic_sampling import fresh_rows, refill_tied_groups, tied_groups
from h1rl.rl.importance import IMPORTANCE_SAMPLING_MODES, importance_sampling_ratio, mismatch_metrics
from h1rl.rl.partial_rollouts import PartialRollouts
from h1rl.rl.row_skipping import rows_with_advantage, zero_advantage_rows_are_inert
from h1rl.rl.training_pass import logps_by_length, sharing_prefix
from h1rl.rollout import RolloutBudget, RolloutEngine, SamplingParams
from h1rl.rollout.engine import find_hybrid

# The TRL methods HybridGRPOTrainer overrides, with their parameters in TRL 1.16 (checked against the installed TRL by
# tests/rl/test_trl_hooks.py), and the TRL attributes it reads: an upgrade that changes any fails there, by name.
TRL_HOOKS = {
    "_generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                              "has_tool_images"),
    "_generate_and_score_completions": ("self", "inputs"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_compute_loss": ("self", "model", "inputs"),
    "_get_per_token_logps_and_entropies": (
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
        "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"),
}
TRL_STATE = (
    "_metrics", "_tokenizer", "eos_token_ids", "reward_weights", "num_generations", "num_generations_eval",
    "num_iterations", "use_vllm", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "loss_type", "beta",
    "top_entropy_quantile", "_entropy_bonus_enabled", "aux_loss_enabled", "model_wrapped", "_tokenize_prompts",
    "reward_funcs", "processing_class",
)


def group_consecutive(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Collapse runs of identical consecutive prompts: ([p0, p0, p1, p1, p1]) -> ([p0, p1], [2, 3])."""
    unique, counts = [], []
    for ids in prompt_ids:
        if unique and unique[-1] == ids:
            counts[-1] += 1
        else:
            unique.append(list(ids))
            counts.append(1)
    return unique, counts


class HybridGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose completions come from `h1rl.rollout.RolloutEngine` (see the module docstring).

    Takes `GRPOTrainer`'s arguments; h1rl's settings are read from `args`, a `HybridGRPOConfig` (`h1rl.rl.config`:
    `dynamic_sampling_rounds`, `skip_zero_advantage_rows`, `share_prompt_prefix`, `length_chunks`,
    `importance_sampling_correction`, `rollout_max_rows`, `rollout_memory_gb`, `rollout_prefill_chunk`). With TRL's
    plain `GRPOConfig` they take HybridGRPOConfig's defaults. Keyword arguments of the same names override `args`
    (for Python users; `rollout_budget=RolloutBudget(...)` overrides the three `rollout_*` settings at once). The
    resolved values are the trainer's attributes of the same names. The model (after PEFT wrapping, if any) must be
    an h1rl `HybridForCausalLM`; vLLM and TRL's continuous batching are refused since the engine replaces them.
    `importance_sampling_correction`: True, False, or None for on unless the policy runs in float32 (all floating
    parameters float32 and no bf16/fp16 mixed precision) or TRL's `vllm_importance_sampling_correction` is False.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, *args: Any, **kwargs: Any):
        from h1rl.rl.config import HYBRID_FIELDS, check_whole_groups, hybrid_settings

        overrides = {name: kwargs.pop(name) for name in HYBRID_FIELDS if name in kwargs}
        rollout_budget: RolloutBudget | None = kwargs.pop("rollout_budget", None)
        # Reward functions are validated on every call: an exception, a wrong length, a non-number or NaN raises an
        # error naming the function and the sample instead of training on garbage (h1rl.rewards.checked).
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        funcs = [checked(f) if callable(f) and not isinstance(f, torch.nn.Module) else f for f in funcs]
        super().__init__(model, funcs if isinstance(reward_funcs, list) else funcs[0], *args, **kwargs)
        settings = hybrid_settings(self.args, overrides)
        local_rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        partial = settings["partial_rollout_budget"] is not None
        check_whole_groups(settings["dynamic_sampling_rounds"], self.accelerator.num_processes, local_rows,
                           self.num_generations, partial_rollouts=partial)
        self.partial_rollouts = None  # h1rl.rl.partial_rollouts, when partial_rollout_budget is set
        if partial:
            extra = settings["partial_rollout_extra_groups"] or max(1, -(-local_rows // self.num_generations // 4))
            self.partial_rollouts = PartialRollouts(settings["partial_rollout_budget"], extra, self.num_generations)
            self.add_callback(self.partial_rollouts.callback(self.accelerator.process_index))
        self.overlap_scoring = settings["overlap_scoring"]
        self._scoring_rows: list[dict] | None = None  # the dataset rows of the rollout being generated
        self._served_rollout: tuple[list[list[int]], list[list[int]], list[list[float]]] | None = None
        self.dynamic_sampling_rounds = settings["dynamic_sampling_rounds"]
        self.skip_zero_advantage_rows = settings["skip_zero_advantage_rows"] and zero_advantage_rows_are_inert(
            self.loss_type, self.beta, self.top_entropy_quantile, self._entropy_bonus_enabled, self.aux_loss_enabled)
        self._last_rewards_per_func: torch.Tensor | None = None
        if self.use_vllm or getattr(self, "use_transformers_continuous_batching", False):
            raise ValueError("HybridGRPOTrainer generates with h1rl's engine: set use_vllm=False and "
                             "use_transformers_paged=False in GRPOConfig")
        base = find_hybrid(self.model)
        if base is None:
            raise TypeError(f"HybridGRPOTrainer needs an h1rl HybridForCausalLM, got {type(self.model).__name__}")
        self._rollout_step = -1  # global step of the last rollout, and how many rollouts ran at that step
        self._rollouts_at_step = 0
        self._served_logps: torch.Tensor | None = None  # (R, L) engine log-probs of the batch being scored
        self._serve_old_logps = False
        self._ratio_inputs: dict | None = None  # the micro-batch whose IS ratio the training forward fills in
        self.share_prompt_prefix = settings["share_prompt_prefix"]  # None: decided per call, where the tensors are
        self.length_chunks = settings["length_chunks"]
        self.rollout_budget = rollout_budget or RolloutBudget(settings["rollout_max_rows"],
                                                              settings["rollout_memory_gb"],
                                                              settings["rollout_prefill_chunk"])
        for module in base.modules():  # a model built before DeepSpeed was imported registers them now
            if isinstance(module, MambaMixer):
                module.register_external_parameters()
        requested = settings["importance_sampling_correction"]
        self.importance_sampling_correction = self._resolve_importance_sampling(True if partial else requested)

    def _resolve_importance_sampling(self, requested: bool | None) -> bool:
        """Whether the sampler/trainer mismatch correction runs (see the module docstring), checked against TRL's
        settings for it, which it reuses."""
        if requested and not self.vllm_importance_sampling_correction:
            raise ValueError("importance_sampling_correction=True contradicts GRPOConfig's "
                             "vllm_importance_sampling_correction=False: set only h1rl's switch")
        on = requested
        if on is None:
            params = [p for p in self.model.parameters() if p.is_floating_point()]
            float32 = all(p.dtype == torch.float32 for p in params) and self.accelerator.mixed_precision == "no"
            on = not float32 and self.vllm_importance_sampling_correction
        mode = self.vllm_importance_sampling_mode
        if on and mode not in IMPORTANCE_SAMPLING_MODES:
            modes = ", ".join(IMPORTANCE_SAMPLING_MODES)
            raise ValueError(f"vllm_importance_sampling_mode: {mode!r} is not one of {modes}")
        if on and self.loss_type == "vespo" and not mode.startswith("token"):  # TRL's own check under vLLM
            raise ValueError(f"loss_type 'vespo' with the importance-sampling correction needs a token-level "
                             f"vllm_importance_sampling_mode ('token_truncate' or 'token_mask'), got {mode!r}")
        return bool(on)

    def _rollout_seed(self) -> int:
        """A seed from (run seed, global step, rollouts so far at this step): the same after a resume, and the same
        in every process (each process samples its own rows of one shared stream, see `_sampling_params`)."""
        step = self.state.global_step
        if step != self._rollout_step:
            self._rollout_step, self._rollouts_at_step = step, 0
        self._rollouts_at_step += 1
        key = (self.args.seed, step, self._rollouts_at_step)
        return hash(key) % (2**62)  # tuples of ints hash the same in every process and run

    def _sampling_params(self, rows: int) -> SamplingParams:
        """The run's sampling settings for `rows` completions on this process: its rows of the global batch's seeded
        stream, so that N processes draw exactly what one process with the whole global batch would."""
        args = self.args
        processes, index = self.accelerator.num_processes, self.accelerator.process_index
        return SamplingParams(
            stream_rows=rows * processes,  # every process generates the same number of rows per call
            stream_offset=rows * index,  # accelerate gives process i the i-th slice of the global batch
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_k=args.top_k or 0,
            top_p=args.top_p if args.top_p is not None else 1.0,
            min_p=args.min_p or 0.0,
            repetition_penalty=args.repetition_penalty,
            stop_token_ids=list(self.eos_token_ids),
            seed=self._rollout_seed(),
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields or has_tool_images:
            raise NotImplementedError("HybridGRPOTrainer handles text-only prompts")
        if self._served_rollout is not None:  # partial rollouts generated this batch already
            prompts, completion_ids, logprobs = self._served_rollout
            if [list(p) for p in prompt_ids] != prompts:
                raise RuntimeError("partial rollouts: TRL tokenized the batch's prompts differently from the rollout")
            return completion_ids, logprobs
        unique, counts = group_consecutive(prompt_ids)
        rollout = self._engine_rollout(unique, counts, rows=self._scoring_rows)
        completion_ids = rollout.completions()
        logprobs = [row[:n].tolist() for row, n in zip(rollout.logprobs, rollout.lengths.tolist())]
        self._served_logps = rollout.logprobs
        return completion_ids, logprobs

    def _engine_rollout(self, prompts, counts, resumed=None, decode_budget=None, rows=None):
        """One engine call (gathered weights under ZeRO-3, as TRL gathers them for `generate`), its metrics logged.
        `rows`: each output row's dataset row, for the rewards that check finished rows while others decode."""
        mode = "train" if self.model.training else "eval"
        fresh = sum(counts)
        if self.partial_rollouts is not None and self.accelerator.num_processes > 1:  # fresh rows differ by process
            fresh = int(self.accelerator.gather(torch.tensor([fresh], device=self.accelerator.device)).max())
        params = self._sampling_params(max(fresh, 1))
        on_finished = self._prefetcher(rows) if rows is not None else None
        start = time.perf_counter()
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
        ):
            engine = RolloutEngine(find_hybrid(unwrapped_model), pad_token_id=self._tokenizer.pad_token_id,
                                   budget=self.rollout_budget)
            rollout = engine.generate(prompts, counts, params, resumed=resumed, decode_budget=decode_budget,
                                      on_finished=on_finished)
        elapsed = time.perf_counter() - start
        self._metrics[mode]["rollout/tokens_per_s"].append(rollout.stats["generated_tokens"] / max(elapsed, 1e-9))
        self._metrics[mode]["rollout/seconds"].append(elapsed)
        self._metrics[mode]["rollout/rows_at_once"].append(rollout.stats.get("rows_at_once", 0.0))
        return rollout

    def _prefetcher(self, rows: list[dict]):
        """The engine's `on_finished` callback that hands finished rows to the rewards that can prefetch (e.g. the
        accuracy reward's math-verify checks), while the other rows still decode; None when none can or
        `overlap_scoring` is off. The rewards themselves are computed later by TRL, unchanged."""
        funcs = [getattr(getattr(f, "func", f), "prefetch", None) for f in self.reward_funcs]
        funcs = [f for f in funcs if callable(f)]
        if not self.overlap_scoring or not funcs or not rows:
            return None
        conversational = is_conversational({"prompt": rows[0]["prompt"]})
        keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")]

        def on_finished(finished: list[int], completion_ids: list[list[int]]) -> None:
            texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            columns = {k: [rows[r][k] for r in finished] for k in keys}
            for prefetch in funcs:
                prefetch(prompts=[rows[r]["prompt"] for r in finished], completions=completions,
                         completion_ids=completion_ids, **columns)

        return on_finished

    def _generate_and_score_completions(self, inputs):
        if self.partial_rollouts is not None and self.model.training:
            inputs = self._partial_rollout_step(inputs)
        try:
            output = self._score_one_round(inputs)
        finally:
            self._served_rollout = None
        if self.dynamic_sampling_rounds and self.model.training:
            # fresh prompts seeded by run seed, step and process: each process refills its own groups
            seed = (self.args.seed * 1_000_003 + self.state.global_step) * 1_009 + self.accelerator.process_index
            output, metrics = refill_tied_groups(output, self._score_one_round, fresh_rows(self.train_dataset, seed),
                                                 self.num_generations, self.dynamic_sampling_rounds,
                                                 self.accelerator.gather)
            for key, value in metrics.items():
                self._metrics["train"][key].append(value)
        else:
            output.pop("_tied")
        if self.importance_sampling_correction:
            output = self._correct_sampling_mismatch(output)
        return output

    def _correct_sampling_mismatch(self, output: dict) -> dict:
        """TRL's vLLM importance-sampling correction with the engine as the sampler, on the final batch.

        When TRL computed the old policy's log-probs (generation and optimizer steps misaligned: the batch is trained
        after an update), the capped ratio against the engine's log-probs is computed here, with TRL's `sampling/*`
        metrics (`h1rl.rl.importance`). Otherwise the batch is trained before any update, so the old policy is the
        policy of the training forward: TRL (under vLLM) and h1rl before would run a separate no-grad forward of
        the whole batch for its log-probs; here the ratio is left to `_compute_loss`, which takes it from the
        training forward's own detached log-probs (`_fill_deferred_ratio`), a forward fewer per step."""
        completion_mask = output["completion_mask"]  # (R, Tc)
        if "old_per_token_logps" not in output:
            token_level = self.vllm_importance_sampling_mode.startswith("token")
            shape = completion_mask.shape if token_level else (completion_mask.shape[0], 1)
            # (R, Tc) or (R, 1): split and shuffled with the rows by TRL; NaN until the training forward fills it
            output["importance_sampling_ratio"] = completion_mask.new_full(shape, float("nan"), dtype=torch.float32)
            return output
        mode = "train" if self.model.training else "eval"
        mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]  # (R, Tc)
        output["importance_sampling_ratio"] = self._ratio_and_metrics(
            output["old_per_token_logps"], output["sampling_per_token_logps"], mask, mode)
        return output

    def _ratio_and_metrics(self, old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor, mode: str
                           ) -> torch.Tensor:
        """TRL's capped ratio pi_old / pi_engine of (R, Tc) log-probs, and its `sampling/*` metrics logged."""
        ratio = importance_sampling_ratio(  # (R, Tc) token modes, (R, 1) sequence modes
            old, sampling, mask, self.vllm_importance_sampling_mode,
            self.vllm_importance_sampling_clip_max, self.vllm_importance_sampling_clip_min,
        )
        metrics = mismatch_metrics(old, sampling, ratio, mask, self.vllm_importance_sampling_mode,
                                   gather=self.accelerator.gather)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        return ratio

    def _fill_deferred_ratio(self, inputs: dict, logps: torch.Tensor) -> None:
        """The ratio of a micro-batch trained before any update: the policy's log-probs `logps` (R, Tc) from its
        training forward, detached, are the old policy's (TRL's own convention in that case)."""
        completion_mask = inputs["completion_mask"]  # (R, Tc)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        inputs["importance_sampling_ratio"] = self._ratio_and_metrics(
            logps.detach(), inputs["sampling_per_token_logps"], mask, mode)

    def _partial_rollout_step(self, inputs: list[dict]) -> list[dict]:
        """The rounds of partial rollouts (`h1rl.rl.partial_rollouts`): the batch's dataset rows, its completions
        kept for TRL's generation call (`_generate_single_turn` serves them)."""
        step, device = self.state.global_step, self.accelerator.device
        seed = (self.args.seed * 1_000_003 + step) * 1_009 + self.accelerator.process_index
        any_process = (lambda flag: bool(self.accelerator.gather(torch.tensor([flag], device=device)).any())
                       ) if self.accelerator.num_processes > 1 else (lambda flag: flag)

        def tokenize(prompts: list) -> list[list[int]]:
            return [list(ids) for ids in self._tokenize_prompts(prompts)[0]]

        def generate(prompts, counts, resumed, budget, rows):
            return self._engine_rollout(prompts, counts, resumed, budget, rows=rows)

        rows, completions, logprobs, metrics = self.partial_rollouts.step(
            inputs, tokenize, generate, fresh_rows(self.train_dataset, seed), any_process, step)
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
        self._served_rollout = (tokenize([r["prompt"] for r in rows]), completions, logprobs)
        return rows

    def _score_one_round(self, inputs):
        self._served_logps = None
        self._scoring_rows = inputs
        # TRL asks for the old policy's log-probs only when generation and optimizer steps are misaligned (its
        # condition in _generate_and_score_completions; vLLM is refused here), and then before anything else. The
        # next policy call of the round, under PEFT with beta > 0, is the reference model (adapter disabled): that
        # one must run the forward, so the engine's log-probs are served once, and only when asked for. Never with
        # the importance-sampling correction on: it compares the training forward's old log-probs with the engine's.
        generate_every = self.args.steps_per_generation * self.num_iterations
        misaligned = self.args.gradient_accumulation_steps % generate_every != 0
        self._serve_old_logps = misaligned and not self.importance_sampling_correction
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._serve_old_logps = False
            self._served_logps = None
        G = self.num_generations if self.model.training else self.num_generations_eval
        output["_tied"] = tied_groups(self._last_rewards_per_func, self.reward_weights, G,  # (R,) group ties
                                      self.accelerator.process_index, self.accelerator.num_processes)
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards
        return rewards

    def _compute_loss(self, model, inputs):
        if self.skip_zero_advantage_rows and self.model.training:
            processes = self.accelerator.num_processes
            device = inputs["advantages"].device
            most = (lambda count: int(self.accelerator.gather(torch.tensor([count], device=device)).max())
                    ) if processes > 1 else (lambda count: count)
            inputs, fraction = rows_with_advantage(inputs, most)
            self._metrics["train"]["train/rows_trained"].append(fraction)
        return self._trl_compute_loss(model, inputs)

    def _trl_compute_loss(self, model, inputs):
        """TRL's loss. TRL multiplies the per-token loss by `inputs["importance_sampling_ratio"]` only under
        `use_vllm` (the engine plays vLLM's role, see `_correct_sampling_mismatch`), so the flag is raised for this
        call alone; within TRL 1.16's `_compute_loss` it gates nothing else."""
        if "importance_sampling_ratio" not in inputs:
            return super()._compute_loss(model, inputs)
        deferred = bool(torch.isnan(inputs["importance_sampling_ratio"]).any())
        self._ratio_inputs = inputs if deferred else None  # filled by the training forward, before TRL reads it
        self.use_vllm = True
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.use_vllm = False
            missed, self._ratio_inputs = self._ratio_inputs is not None, None
        if missed:  # TRL 1.16 computes the policy's log-probs first; a TRL that does not would train on NaN
            raise RuntimeError("HybridGRPOTrainer: the importance-sampling ratio was not filled in by the training "
                               "forward (TRL's _compute_loss no longer calls _get_per_token_logps_and_entropies "
                               "with compute_entropy=True first?)")
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        target = self._ratio_inputs
        if target is not None and kwargs.get("compute_entropy", False):
            # set only inside `_trl_compute_loss`, whose one forward with entropies is the policy's training forward
            # (`model` may be the DeepSpeed engine wrapping self.model): its log-probs give the ratio
            self._ratio_inputs = None
            logps, entropies, aux = self._logps_by_length(model, input_ids, attention_mask, logits_to_keep, *args,
                                                          **kwargs)
            self._fill_deferred_ratio(target, logps)
            return logps, entropies, aux
        serve = (
            self._serve_old_logps
            and self._served_logps is not None
            and model is self.model
            and not kwargs.get("compute_entropy", False)
            and not kwargs.get("compute_aux_loss", False)
            and input_ids.shape[0] == self._served_logps.shape[0]
        )
        if not serve:
            return self._logps_by_length(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        self._serve_old_logps = False  # once per round (see _score_one_round)
        self._metrics["train" if self.model.training else "eval"]["rollout/old_logps_served"].append(1.0)
        served = self._served_logps.to(input_ids.device)
        logps = served.new_zeros(served.shape[0], logits_to_keep)
        width = min(logits_to_keep, served.shape[1])
        logps[:, :width] = served[:, :width]
        return logps, None, None

    def _logps_by_length(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's forward over rows grouped by length, each prompt once where that is on (`h1rl.rl.training_pass`)."""
        on_cuda = input_ids.is_cuda

        def forward(ids, mask, keep):
            with sharing_prefix(model, ids.shape[1] - keep, self.share_prompt_prefix, on_cuda):
                return super(HybridGRPOTrainer, self)._get_per_token_logps_and_entropies(
                    model, ids, mask, keep, *args, **kwargs)

        multimodal = {k: v for k, v in kwargs.items() if k not in ("batch_size", "compute_entropy", "compute_aux_loss")}
        if args or kwargs.get("compute_aux_loss", False) or any(v is not None for v in multimodal.values()):
            # inputs TRL slices by row itself, or an aux loss (averaged over forwards): one forward, as TRL
            return forward(input_ids, attention_mask, logits_to_keep)
        processes = self.accelerator.num_processes
        fewest = (lambda count: int(self.accelerator.gather(torch.tensor([count], device=input_ids.device)).min())
                  ) if processes > 1 else (lambda count: count)
        logps, entropies, computed = logps_by_length(forward, input_ids, attention_mask, logits_to_keep,
                                                     self.length_chunks, fewest, kwargs.get("batch_size"))
        if self.model.training and torch.is_grad_enabled():  # the training pass (TRL's other forwards are no-grad)
            self._metrics["train"]["train/forward_positions"].append(computed)
        return logps, entropies, None
