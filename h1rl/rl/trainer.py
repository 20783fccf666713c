"""`HybridGRPOTrainer`: TRL's GRPOTrainer with rollouts from h1rl's recurrent engine.

Everything about the algorithm stays TRL's (`GRPOConfig`, loss types, KL and reference model, reward contract,
logging, PEFT, accelerate and DeepSpeed integration). Two methods are replaced, both private TRL hooks, which is
why `pyproject.toml` pins `trl>=1.16,<1.17` and `tests/rl/` exercises them against that range:

- `_generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, ...)`: TRL's generation step.
  Here the distinct prompts of the batch (TRL repeats each one `num_generations` times in a row) are prefilled
  once and sampled by `h1rl.rollout.RolloutEngine` with the run's sampling settings. Under DeepSpeed ZeRO-3 the
  parameters are gathered once for the whole rollout phase (TRL's `unwrap_model_for_generation`), never per
  token. The engine's per-token log-probs come back to TRL as the sampling log-probs.
- `_get_per_token_logps_and_entropies(...)`: when TRL asks for the *old* policy's log-probs of the batch it just
  generated (it does so when generation and optimisation steps are misaligned, i.e. `steps_per_generation` or
  `num_iterations` > 1), the engine's log-probs are returned instead of running one more forward pass: they are
  the same numbers (`tests/rollout/test_engine.py` bounds the difference by 1e-4 in float32). Every other call
  (the policy's training forward, the reference model) runs normally. Not with the importance-sampling correction
  on (below), which needs the training side's own numbers.

Why not TRL's public `rollout_func`: it is marked experimental, receives un-tokenised prompts (so chat templating
would have to be redone here), and its log-probs are only used with vLLM. The two hooks above keep TRL's
tokenisation, tool and logging code paths intact.

Beyond TRL, optional dynamic sampling (DAPO): prompt groups whose rewards all tie have zero advantage and give no
gradient; with `dynamic_sampling_rounds > 0` such groups are replaced by groups of fresh prompts, generated and
scored in up to that many extra rounds per batch (the cap). Groups still tied after the last round stay in the
batch, so its size never changes. Logged as `dynamic_sampling/*`. With several processes, each refills its own
groups (it must hold whole groups) and all run the same rounds with equally many fresh groups, as TRL's gathers
need; fresh prompts then differ by process, so such a run is not identical to a single-process one.

Also beyond TRL, and exact: rows whose advantage is exactly zero (every row of a tied group, with the usual 0/1
rewards) contribute exactly zero to the loss and its gradient when the loss is normalised by the batch's token
count (`loss_type` "dapo", TRL's default, "cispo" or "vespo"), `beta` is 0 and no entropy term is in play. With
`skip_zero_advantage_rows=True` (the default) the training forward and backward then run on the other rows only:
the same gradient up to float summation order, for the compute of the rows that carry a signal. Where the
conditions do not hold every row is trained on, as in TRL. The entropy and clip-ratio logs then cover the trained
rows; `train/rows_trained` logs the fraction kept. With several processes each keeps as many rows as the one
that keeps the most (TRL gathers per-row metrics, which needs equal counts).

And one more: TRL's training forward runs each of a prompt's G rows over the whole prompt again. With
`share_prompt_prefix` it runs under `HybridModel.sharing_prefix`: each distinct prompt once, each row continuing
from its prompt's cached state, with gradients flowing back through that state. Same log-probs and gradients up to
float rounding (`tests/models/test_shared_prefix.py`), for the prompt's compute divided by G. Default (None): on on
CPU, off on CUDA. The continuation attends over left-padded prompts in the cache, which takes a key mask: on CUDA the
memory-efficient kernel materialises it as a (T, S) bias per attention layer and keeps it for the backward (128 MiB
per row and layer at 8k tokens), while the plain training forward runs left-aligned on the flash kernel with no
mask. Under gradient checkpointing (the setting at scale) sharing is not taken anyway. Every process runs the same
two-phase forward whatever its rows hold (ZeRO-3).

The rollout engine runs within `rollout_budget` (`h1rl.rollout.RolloutBudget`: rows decoded at once, memory, prefill
chunk; by default 90% of the free CUDA memory after TRL gathered the weights). With `ds3_gather_for_generation:
false` the weights stay partitioned during the rollout and the engine keeps every process's model calls in step
(synced decoding); m2 mixers register the parameters they read outside their own modules with DeepSpeed.

And a third: TRL pads every completion of the batch to the longest one and runs one forward over the padded
rectangle, so with RL's spread of completion lengths much of that forward (and backward) computes padding. The
training forward here runs over at most `length_chunks` (default 4) groups of rows of similar length, each trimmed
to its own longest row and first prompt column (`plan_length_chunks` picks the groups that leave the fewest
positions; `train/forward_positions` logs the fraction of the rectangle computed). A causal model's log-probs of
a row do not depend on the padding after it nor on masked columns before it, so this is exact too
(`tests/rl/test_length_chunks.py`); `length_chunks=1` still trims the batch to its own longest row.

And TRL's sampler/trainer mismatch correction, which TRL runs only with vLLM: the engine plays vLLM's role. With
`importance_sampling_correction` on (None, the default: on unless the policy runs in float32, where rollout and
training log-probs agree to 1e-5; bfloat16 kernels do not), `_generate_and_score_completions` recomputes the old
policy's log-probs with the training forward when TRL did not (a no-grad forward, as TRL does under vLLM; the
engine's log-probs are then never served as old ones), computes TRL's capped ratio pi_old / pi_engine with TRL's
`vllm_importance_sampling_mode` / `_clip_max` / `_clip_min` (`h1rl.rl.importance`) and logs TRL's `sampling/*`
metrics. It does so once, on the final batch: after dynamic sampling's refills, whose `merge_rows` re-pads the
engine's (and TRL's old) log-probs on the right like the completions. `_compute_loss` hands the ratio to TRL's loss,
which multiplies the per-token loss by it only under `use_vllm` ("vespo" folds it into its weights regardless): the
flag is raised for the duration of TRL's `_compute_loss` alone, where it gates nothing else in TRL 1.16
(`tests/rl/test_importance.py` checks that the loss and gradient scale with the ratio). Rows left out by
`skip_zero_advantage_rows` take their ratio with them.

Rollouts are seeded from (`args.seed`, global step, rollouts so far at that step), so a resumed run draws the same
completions as an uninterrupted one; each process samples its own rows of that step's global stream, so a run on N
processes draws the same completions as one process holding the whole global batch.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation

from h1rl.models.mamba import MambaMixer
from h1rl.rewards import checked
from h1rl.rl.importance import IMPORTANCE_SAMPLING_MODES, importance_sampling_ratio, mismatch_metrics
from h1rl.rollout import RolloutBudget, RolloutEngine, SamplingParams
from h1rl.rollout.engine import find_hybrid


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


def merge_rows(target: dict, source: dict, target_rows: range, source_rows: range) -> dict:
    """`target` with rows `target_rows` replaced by `source`'s rows `source_rows` (per-row tensors re-padded).

    Prompts are left-padded and completions right-padded, so widths are matched on the matching side.
    """
    merged = dict(target)
    t_idx, s_idx = list(target_rows), list(source_rows)
    for key, value in target.items():
        other = source.get(key)
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or other is None:
            continue
        left = key.startswith("prompt")
        width = max(value.shape[1], other.shape[1]) if value.dim() > 1 else None
        if width is not None:
            value, other = _pad_to(value, width, left), _pad_to(other, width, left)
        value = value.clone()
        value[t_idx] = other[s_idx].to(value.dtype)
        merged[key] = value
    return merged


def plan_length_chunks(lengths: torch.Tensor, max_chunks: int, tolerance: float = 0.05) -> list[torch.Tensor]:
    """Split rows into at most `max_chunks` groups of similar length, so that a forward over each group trimmed to
    its own longest row computes as few padded positions as possible.

    `lengths` (R,) long: each row's length (its last real column + 1). Rows are sorted by length and cut into
    contiguous groups by dynamic programming over the distinct lengths, minimising the positions computed
    (sum over groups of rows x longest row); the fewest groups within `tolerance` of the best split's positions
    (relative to one group) are chosen, since each extra forward costs time of its own; with `tolerance=0` that is
    exactly min(`max_chunks`, distinct lengths) groups, since splitting a group of several lengths always saves
    positions. Returns the row indices of each group (ascending within a group), shortest group first.
    """
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    order = torch.argsort(lengths.cpu(), stable=True)  # (R,)
    values, counts = torch.unique_consecutive(lengths.cpu()[order], return_counts=True)  # (U,), (U,)
    U, K = values.numel(), min(max_chunks, values.numel())
    if K == 1:
        return [order.sort().values]
    rows_before = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).double()  # (U+1,) rows with a shorter length
    # cost[i, j]: positions computed by one group holding distinct lengths i..j-1 (its rows x its longest length)
    i, j = torch.arange(U + 1)[:, None], torch.arange(U + 1)[None, :]
    cost = (rows_before[None, :] - rows_before[:, None]) * values.double()[(j - 1).clamp(min=0)]  # (U+1, U+1)
    cost = torch.where(i < j, cost, torch.full_like(cost, float("inf")))
    best, cuts = [cost[0]], []  # best[k-1][j]: fewest positions covering lengths 0..j-1 with k groups
    for _ in range(1, K):
        total = best[-1][:, None] + cost  # (U+1, U+1): the first groups end at i, one more group covers i..j-1
        value, arg = total.min(0)
        best.append(value)
        cuts.append(arg)
    finals = torch.stack([b[U] for b in best])  # (K,)
    k = int((finals - finals[-1] <= tolerance * finals[0]).nonzero()[0]) + 1  # fewest groups near the best
    bounds, j = [U], U
    for level in range(k - 1, 0, -1):
        j = int(cuts[level - 1][j])
        bounds.append(j)
    bounds = [int(rows_before[b]) for b in reversed(bounds)]  # row offsets into `order`: 0 = bounds[0] < ... = R
    return [order[a:b].sort().values for a, b in zip([0] + bounds[:-1], bounds) if b > a]


def _pad_to(t: torch.Tensor, width: int, left: bool) -> torch.Tensor:
    missing = width - t.shape[1]
    if missing == 0:
        return t
    pad = t.new_zeros(t.shape[0], missing, *t.shape[2:])
    return torch.cat([pad, t] if left else [t, pad], dim=1)


class HybridGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose completions come from `h1rl.rollout.RolloutEngine` (see the module docstring).

    Takes `GRPOTrainer`'s arguments plus h1rl's keyword-only switches (see the module docstring). The model (after
    PEFT wrapping, if any) must be an h1rl `HybridForCausalLM`; vLLM and TRL's continuous batching are refused since
    the engine replaces them. `importance_sampling_correction`: True, False, or None for on unless the policy runs in
    float32 (all floating parameters float32 and no bf16/fp16 mixed precision) or TRL's
    `vllm_importance_sampling_correction` is False; the resolved value is the attribute of the same name.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, *args: Any, dynamic_sampling_rounds: int = 0,
                 skip_zero_advantage_rows: bool = True, share_prompt_prefix: bool | None = None,
                 length_chunks: int = 4, importance_sampling_correction: bool | None = None,
                 rollout_budget: RolloutBudget | None = None, **kwargs: Any):
        # Reward functions are validated on every call: an exception, a wrong length, a non-number or NaN raises an
        # error naming the function and the sample instead of training on garbage (h1rl.rewards.checked).
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        funcs = [checked(f) if callable(f) and not isinstance(f, torch.nn.Module) else f for f in funcs]
        super().__init__(model, funcs if isinstance(reward_funcs, list) else funcs[0], *args, **kwargs)
        if dynamic_sampling_rounds < 0:
            raise ValueError(f"dynamic_sampling_rounds must be >= 0, got {dynamic_sampling_rounds}")
        if length_chunks < 1:
            raise ValueError(f"length_chunks must be >= 1, got {length_chunks}")
        local_rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if dynamic_sampling_rounds and self.accelerator.num_processes > 1 and local_rows % self.num_generations:
            raise ValueError(
                f"dynamic sampling with {self.accelerator.num_processes} processes needs whole groups on each process: "
                f"per_device_train_batch_size x steps_per_generation ({local_rows}) must be a multiple of "
                f"num_generations ({self.num_generations})"
            )
        self.dynamic_sampling_rounds = dynamic_sampling_rounds
        self.skip_zero_advantage_rows = skip_zero_advantage_rows and self._zero_advantage_rows_are_inert()
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
        self.share_prompt_prefix = share_prompt_prefix  # None: decided per call, where the tensors are (see below)
        self.length_chunks = length_chunks
        self.rollout_budget = rollout_budget or RolloutBudget()
        for module in base.modules():  # a model built before DeepSpeed was imported registers them now
            if isinstance(module, MambaMixer):
                module.register_external_parameters()
        self.importance_sampling_correction = self._resolve_importance_sampling(importance_sampling_correction)

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
        mode = "train" if self.model.training else "eval"
        unique, counts = group_consecutive(prompt_ids)
        params = self._sampling_params(len(prompt_ids))
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
            rollout = engine.generate(unique, counts, params)
        elapsed = time.perf_counter() - start
        completion_ids = rollout.completions()
        logprobs = [row[:n].tolist() for row, n in zip(rollout.logprobs, rollout.lengths.tolist())]
        self._served_logps = rollout.logprobs
        self._metrics[mode]["rollout/tokens_per_s"].append(float(rollout.lengths.sum()) / max(elapsed, 1e-9))
        self._metrics[mode]["rollout/seconds"].append(elapsed)
        self._metrics[mode]["rollout/rows_at_once"].append(rollout.stats["rows_at_once"])
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        output = self._score_one_round(inputs)
        if self.dynamic_sampling_rounds and self.model.training:
            output = self._refill_tied_groups(inputs, output)
        if self.importance_sampling_correction:
            output = self._correct_sampling_mismatch(output)
        return output

    def _correct_sampling_mismatch(self, output: dict) -> dict:
        """TRL's vLLM importance-sampling correction with the engine as the sampler, on the final batch: the old
        policy's log-probs from the training forward (run here, no grad, when TRL did not run it), the capped ratio
        against the engine's log-probs for `_compute_loss`, and TRL's `sampling/*` metrics (`h1rl.rl.importance`)."""
        mode = "train" if self.model.training else "eval"
        completion_mask = output["completion_mask"]  # (R, Tc)
        mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]  # (R, Tc)
        if "old_per_token_logps" not in output:  # TRL ran it only for misaligned generation and optimizer steps
            input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)  # (R, Tp + Tc)
            attention_mask = torch.cat([output["prompt_mask"], completion_mask], dim=1)  # (R, Tp + Tc)
            args = self.args
            batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
            with torch.no_grad(), disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
                output["old_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, completion_mask.shape[1], batch_size=batch_size
                )
        old, sampling = output["old_per_token_logps"], output["sampling_per_token_logps"]  # (R, Tc), (R, Tc)
        ratio = importance_sampling_ratio(  # (R, Tc) token modes, (R, 1) sequence modes
            old, sampling, mask, self.vllm_importance_sampling_mode,
            self.vllm_importance_sampling_clip_max, self.vllm_importance_sampling_clip_min,
        )
        metrics = mismatch_metrics(old, sampling, ratio, mask, self.vllm_importance_sampling_mode,
                                   gather=self.accelerator.gather)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        output["importance_sampling_ratio"] = ratio
        return output

    def _score_one_round(self, inputs):
        self._served_logps = None
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
        output["_tied"] = self._tied_groups()  # (R,) bool per row: its group's rewards all equal
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards
        return rewards

    def _tied_groups(self) -> torch.Tensor:
        """Per row of this process: whether its group's (weighted) rewards have zero spread, as TRL computes them.

        TRL gathers the rewards of all processes; with dynamic sampling each process holds whole groups (checked at
        init), so this process's rows are its slice of the gathered ones.
        """
        G = self.num_generations if self.model.training else self.num_generations_eval
        rewards = (self._last_rewards_per_func * self.reward_weights.to(self._last_rewards_per_func.device)).nansum(1)
        grouped = rewards.view(-1, G)
        tied = ((grouped.max(1).values - grouped.min(1).values).abs() <= 1e-8).repeat_interleave(G)
        local = tied.numel() // self.accelerator.num_processes
        return tied[self.accelerator.process_index * local : (self.accelerator.process_index + 1) * local]

    def _refill_tied_groups(self, inputs: list[dict], output: dict) -> dict:
        G = self.num_generations
        tied = output.pop("_tied")
        dropped, rounds = int(self.accelerator.gather(tied.sum().reshape(1)).sum()) // G, 0  # all processes
        extra_prompts = self._extra_prompt_rows()
        while rounds < self.dynamic_sampling_rounds:
            # every process runs the same rounds with the same number of rows (TRL's scoring gathers across them):
            # as many fresh groups as the process with the most tied groups needs
            need = int(self.accelerator.gather(tied.sum().reshape(1)).max()) // G
            if need == 0:
                break
            fresh = [next(extra_prompts) for _ in range(need)]
            candidate = self._score_one_round([row for row in fresh for _ in range(G)])
            useful = ~candidate.pop("_tied")
            rounds += 1
            slots = tied.nonzero()[:, 0].view(-1, G)[:, 0]  # first row of each tied group
            sources = useful.nonzero()[:, 0].view(-1, G)[:, 0]
            for slot, source in zip(slots.tolist(), sources.tolist()):  # zip: stops at the shorter list
                output = merge_rows(output, candidate, range(slot, slot + G), range(source, source + G))
                tied[slot : slot + G] = False
        mode = "train"
        self._metrics[mode]["dynamic_sampling/tied_groups"].append(float(dropped))
        self._metrics[mode]["dynamic_sampling/extra_rounds"].append(float(rounds))
        tied_after = int(self.accelerator.gather(tied.sum().reshape(1)).sum()) // G
        self._metrics[mode]["dynamic_sampling/tied_after"].append(float(tied_after))
        output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()
        return output

    def _extra_prompt_rows(self):
        """An endless, seeded stream of dataset rows to refill tied groups (seeded by run seed, step and process)."""
        seed = (self.args.seed * 1_000_003 + self.state.global_step) * 1_009 + self.accelerator.process_index
        generator = torch.Generator().manual_seed(seed)  # each process draws its own fresh prompts
        while True:
            for index in torch.randperm(len(self.train_dataset), generator=generator).tolist():
                yield self.train_dataset[index]

    def _zero_advantage_rows_are_inert(self) -> bool:
        """Whether a row with advantage 0 adds exactly nothing to the loss of its micro-batch, so that leaving it out
        of the training pass changes nothing: its policy term is -A * (clipped) ratio = 0, and the loss is divided by
        the batch's precomputed token count (`num_items_in_batch`), not by anything that counts this micro-batch's
        rows. A KL term, an entropy bonus or an entropy quantile mask (computed over the rows present) breaks this."""
        return (
            self.loss_type in ("dapo", "cispo", "vespo")
            and self.beta == 0.0
            and self.top_entropy_quantile == 1.0
            and not self._entropy_bonus_enabled
            and not self.aux_loss_enabled
        )

    def _compute_loss(self, model, inputs):
        if not self.skip_zero_advantage_rows or not self.model.training:
            return self._trl_compute_loss(model, inputs)
        advantages = inputs["advantages"]  # (R,) or (R, L)
        rows = advantages.shape[0]
        carries = (advantages != 0).reshape(rows, -1).any(1)  # (R,)
        # Every process keeps as many rows as the process that keeps the most (at least one): TRL gathers per-row
        # metrics across processes, which needs equal row counts, and every process must run a forward and backward
        # (DDP, ZeRO). The rows added back are zero-advantage rows, so the loss is unchanged.
        count = int(carries.sum().clamp(min=1))
        if self.accelerator.num_processes > 1:
            count = int(self.accelerator.gather(torch.tensor([count], device=advantages.device)).max())
        self._metrics["train"]["train/rows_trained"].append(count / rows)
        if count == rows:
            return self._trl_compute_loss(model, inputs)
        order = torch.argsort((~carries).to(torch.uint8), stable=True)  # rows with an advantage first, in order
        index = order[:count].sort().values
        kept = {
            key: value.index_select(0, index.to(value.device))
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
            else value
            for key, value in inputs.items()
        }  # the importance-sampling ratio, (R, Tc) or (R, 1), included
        return self._trl_compute_loss(model, kept)

    def _trl_compute_loss(self, model, inputs):
        """TRL's loss. TRL multiplies the per-token loss by `inputs["importance_sampling_ratio"]` only under
        `use_vllm` (the engine plays vLLM's role, see `_correct_sampling_mismatch`), so the flag is raised for this
        call alone; within TRL 1.16's `_compute_loss` it gates nothing else."""
        if "importance_sampling_ratio" not in inputs:
            return super()._compute_loss(model, inputs)
        self.use_vllm = True
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.use_vllm = False

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
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
        """TRL's log-probs (and entropies) of the completion tokens, computed over groups of rows of similar length,
        each trimmed to its own padding (`plan_length_chunks`; `length_chunks` groups at most), each under
        `sharing_prefix` where that is on. Causal models make this exact: a row's log-probs do not depend on the
        padding after it, nor on the columns before its prompt, which its attention mask hides and which are left
        out of its position ids. Padding positions come back as 0."""
        multimodal = {k: v for k, v in kwargs.items() if k not in ("batch_size", "compute_entropy", "compute_aux_loss")}
        if args or kwargs.get("compute_aux_loss", False) or any(v is not None for v in multimodal.values()):
            # inputs TRL slices by row itself, or an aux loss (averaged over forwards): one forward, as TRL
            return self._logps_sharing_prefix(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        R, width = input_ids.shape
        prompt_width = width - logits_to_keep  # TRL scores the completion, the last logits_to_keep columns
        columns = torch.arange(1, width + 1, device=attention_mask.device)
        ends = torch.where(attention_mask.bool(), columns, 0).amax(1).clamp(min=prompt_width + 1)  # (R,) last real + 1
        batch_size = kwargs.get("batch_size")
        if prompt_width < 1:
            chunks = None  # no prompt column to keep: one forward, as TRL
        elif batch_size:
            # TRL caps each forward at batch_size rows (its no-grad old and reference log-probs): as many forwards
            # as TRL runs, so every process runs the same count, each over rows of similar length
            order = torch.argsort(ends.cpu(), stable=True)
            chunks = [order[i : i + batch_size].sort().values for i in range(0, R, batch_size)]
        else:
            chunks = plan_length_chunks(ends, self.length_chunks)
        if not batch_size and self.accelerator.num_processes > 1:
            # every process must run as many forwards: DDP broadcasts buffers and ZeRO-3 gathers parameters in each
            # one (unequal counts hang). Each process can split into as many groups as the one that splits least.
            count = 1 if chunks is None else len(chunks)
            fewest = int(self.accelerator.gather(torch.tensor([count], device=input_ids.device)).min())
            if fewest != count:
                chunks = plan_length_chunks(ends, fewest, tolerance=0.0)  # exactly `fewest` groups (see its doc)
        if chunks is None:
            return self._logps_sharing_prefix(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        logps, entropies, computed = [], [], 0
        for rows in chunks:
            rows = rows.to(input_ids.device)
            mask = attention_mask.index_select(0, rows)  # (n, Tp + Tc)
            used = mask.bool().any(0).nonzero()[:, 0]  # columns some row of the group needs
            first = min(int(used[0]), prompt_width - 1) if used.numel() else prompt_width - 1  # >= 1 prompt column
            end = max(int(used[-1]) + 1, prompt_width + 1) if used.numel() else prompt_width + 1  # >= 1 scored
            keep = end - prompt_width  # completion columns of this group
            lp, ent, _ = self._logps_sharing_prefix(
                model, input_ids.index_select(0, rows)[:, first:end], mask[:, first:end], keep, *args, **kwargs
            )
            logps.append(_pad_to(lp, logits_to_keep, left=False))
            entropies.append(None if ent is None else _pad_to(ent, logits_to_keep, left=False))
            computed += rows.numel() * (end - first)
        if self.model.training and torch.is_grad_enabled():  # the training pass (TRL's other forwards are no-grad)
            self._metrics["train"]["train/forward_positions"].append(computed / (R * width))
        inverse = torch.argsort(torch.cat(chunks)).to(input_ids.device)  # back to the caller's row order
        logps = torch.cat(logps).index_select(0, inverse)
        entropies = None if entropies[0] is None else torch.cat(entropies).index_select(0, inverse)
        return logps, entropies, None

    def _logps_sharing_prefix(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's forward, under `HybridModel.sharing_prefix` when `share_prompt_prefix` says so for this batch."""
        hybrid = find_hybrid(model)
        prompt_width = input_ids.shape[1] - logits_to_keep
        share = self.share_prompt_prefix
        if share is None:  # auto: off on CUDA, where the continuation's key mask costs more memory than it saves
            share = not input_ids.is_cuda
        share = share and hybrid is not None and prompt_width >= 1
        with hybrid.model.sharing_prefix(prompt_width) if share else nullcontext():
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
