"""The rollout engine: G completions per prompt from a hybrid model, within a memory budget, with their log-probs.

Why not `model.generate`: GRPO samples G completions of each prompt, and a hybrid's decode state is small, so the
work that matters is (1) prefilling each distinct prompt once, (2) decoding with no per-step Python or allocation
overhead beyond the model itself, (3) not paying for rows that already finished, (4) bounding memory whatever the
batch (a 15B hybrid's attention layers hold 80 KiB of KV per token per row: 2.6 GiB for one 33k-token row), and
(5) returning per-token log-probs that equal the trainer's recomputation. `generate` does none of these.

How a rollout phase runs (`RolloutEngine.generate`):
1. Slots. The decode cache has `slots` rows of `longest prompt + max_new_tokens` KV columns, allocated once;
   `slots` comes from the `RolloutBudget` (`bytes_per_row`: decode cache, a prompt's prefill state, prefill
   activations and sampling temporaries per row; by default 90% of the free memory on CUDA, every row at once on
   CPU). Rows are left-aligned: a row's tokens start at column 0 of its slot, so a row's RoPE position is its column.
2. Continuous batching. Rows wait in prompt-major order; whenever slots are free, the next waiting rows are admitted:
   their distinct prompts are prefilled once (a prompt whose rows straddle two admissions keeps its state for the
   next one), each slot receives its prompt's state (constant-size Mamba state, the prompt's KV columns), and the
   first token is sampled. A row that finishes frees its slot for the next waiting row at once; when no row waits,
   the slots of finished rows are compacted away (`compact_fraction`), so the tail decodes a smaller batch.
3. Chunked prefill. Prompts are prefilled `prefill_chunk` tokens at a time, each chunk continuing from the cache:
   the scan from its state, attention over the KV already written (lower-right causal, no mask). Rows are sorted by
   prompt length and left-aligned, so a chunk's shorter rows are a suffix dropped from later chunks and their last
   chunk is right-padded (pads after the tokens: no attention mask; the Mamba state is taken at the last token).
4. Each decode step runs one token for every occupied slot through `h1rl.rollout.decode_step.StaticDecoder`: each
   row writes its own KV column and reads its own columns (a key mask; the memory-efficient kernel), Mamba layers
   step their state in place. `decode`: "eager" reads the columns filled so far, "static" the whole buffer, and
   "cuda_graph" replays that step as CUDA graphs per (batch, key-length) bucket. "auto" is "eager" for now: the
   CUDA graph path has not yet run on a GPU (h1rl/bench/gpu_check.py is the prepared check).
5. Synced decoding (`synced`; on by default when several processes run and DeepSpeed ZeRO-3 manages the weights):
   left partitioned for generation (`ds3_gather_for_generation: false`), ZeRO-3 gathers each module's parameters
   through hooks at every call, so every process must make the same number of model calls. Before each call the
   processes agree (one all-reduce) whether any of them still has work; one that has none makes a one-token call on
   a scratch cache, through the same modules in the same order (prefill, decode and that call share one module
   sequence).
6. Log-probs are `log_softmax(logits / temperature)` of each drawn token (see `h1rl.rollout.sampling`). Row r's
   t-th token uses the uniform at (t, r) of one seeded stream, drawn in token order, whatever the slot, step or
   budget, so a rollout under a tight budget samples the same tokens as an unbounded one.
7. Partial rollouts: with a `decode_budget`, rows still running after that many decode steps come back unfinished
   ("partial"); `Rollout.resume(row)` turns one into a `ResumedRow`, which a later call continues from its tokens
   (re-prefilled by the model as it is then) with the uniforms of its own stream: under an unchanged model it
   continues exactly as it would have in one go. `h1rl.rollout.phase` holds one phase's state machine.

Rows are prompt-major: output row r * G + g is completion g of prompt r.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from h1rl.models.cache import HybridCache
from h1rl.models.configuration import HybridConfig
from h1rl.models.modeling import HybridForCausalLM
from h1rl.rollout.decode_step import graphs_unsupported_reason, zero3_managed
from h1rl.rollout.phase import Phase, ResumedRow, row_plans
from h1rl.rollout.sampling import SamplingParams

COMPACT_FRACTION = 0.125  # compact the active batch once this fraction of its rows has finished (nothing waiting)
DECODE_MODES = ("auto", "eager", "static", "cuda_graph")  # see the module docstring
FREE_MEMORY_FRACTION = 0.9  # of the free CUDA memory, the default rollout budget
SAMPLING_COPIES = 8  # float32 (rows, vocab) tensors alive while sampling one step (logits, log-softmax, sort, cdf)

Call = tuple[str, Callable[[], torch.Tensor]]  # ("prefill" | "decode", a model call)


@dataclass
class RolloutBudget:
    """What a rollout phase may hold at once (see the module docstring).

    `max_rows`: rows decoded at once (slots); None: as many as the memory budget holds. `memory_gb`: bytes for the
    decode cache, prefill and sampling, on top of the weights; None: 90% of the free device memory on CUDA, and no
    limit on CPU. `prefill_chunk`: prompt tokens per row per prefill forward (bounds the prefill's activations).
    """

    max_rows: int | None = None
    memory_gb: float | None = None
    prefill_chunk: int = 2048

    def __post_init__(self):
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 (or None), got {self.max_rows}")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise ValueError(f"memory_gb must be > 0 (or None), got {self.memory_gb}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


def bytes_per_row(config: HybridConfig, max_len: int, prompt_len: int, prefill_chunk: int, dtype_bytes: int,
                  rows_per_prompt: float = 1.0) -> int:
    """Device bytes one decoded row holds during a rollout phase: its slot (KV for `max_len` tokens in the attention
    layers, the Mamba state), its share of its prompt's prefill (the prompt's state before the copy into the slots,
    a prefill chunk's activations: the `rows_per_prompt` rows of a prompt share one), sampling temporaries and
    bookkeeping. `h1rl bench memory --measure` checks it against the measured peak (within 1% at the 15B shape)."""
    layout = config.hybrid_block_layout
    ssm = config.ssm
    kv_per_token = layout.count("t") * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    mamba = layout.count("m2") * (ssm.d_inner * ssm.d_conv * dtype_bytes + ssm.d_inner * ssm.d_state * 4)
    D, inter = config.hidden_size, config.intermediate_size
    mixer_width = 2 * ssm.d_inner + 2 * ssm.d_xb + 2 * ssm.d_inner + 2 * ssm.d_inner * 4 // dtype_bytes
    attention_width = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim * 2
    layer_width = 4 * D + max(3 * inter, mixer_width, attention_width)  # the widest point of one layer, per token
    prefill_activations = min(prefill_chunk, prompt_len) * layer_width * dtype_bytes
    sampling = SAMPLING_COPIES * config.vocab_size * 4
    bookkeeping = max_len * 8 + (max_len - prompt_len) * 12  # history, completion ids and log-probs
    prefill = (kv_per_token * prompt_len + mamba + prefill_activations) / max(rows_per_prompt, 1.0)
    return int(kv_per_token * max_len + mamba + prefill + sampling + bookkeeping)


def memory_budget(budget: RolloutBudget, device: torch.device) -> tuple[float | None, str]:
    """The bytes a rollout phase may use on `device` and where that figure comes from; None: no limit (CPU)."""
    if budget.memory_gb is not None:
        return budget.memory_gb * 2**30, f"memory_gb={budget.memory_gb}"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return FREE_MEMORY_FRACTION * free, f"{FREE_MEMORY_FRACTION:.0%} of the free memory of {device}"
    return None, "no limit on the CPU"


@dataclass
class Rollout:
    """The completions of one rollout phase (B prompts x G generations = R rows, prompt-major)."""

    prompt_ids: list[list[int]]  # R: the prompt of each row, unpadded
    completion_ids: torch.Tensor  # (R, L) long, padded with pad_token_id after each row's end; L = longest
    logprobs: torch.Tensor  # (R, L) float32, log-prob of each completion token; 0 on padding
    lengths: torch.Tensor  # (R,) long: completion tokens per row (the stop token included)
    finish_reasons: list[str]  # R: "stop" (emitted a stop token), "length" (reached max_new_tokens) or "partial"
    # (still running when the decode budget was spent: continue it with `ResumedRow`)
    stats: dict[str, float] = field(default_factory=dict)  # prefill/decode seconds, tokens, tokens per second
    origins: list[tuple[int, int, int]] = field(default_factory=list)  # R: (seed, rows per draw, index): its uniforms
    resumed_lengths: torch.Tensor | None = None  # (R,) long: tokens sampled before this call (resumed rows)

    def resume(self, row: int) -> ResumedRow:
        """Row `row`, set aside unfinished ("partial"), as a `ResumedRow` to continue in a later call."""
        n = int(self.lengths[row])
        return ResumedRow(self.prompt_ids[row], self.completion_ids[row, :n].tolist(),
                          self.logprobs[row, :n].tolist(), self.origins[row])

    def completions(self) -> list[list[int]]:
        """Each row's completion ids, unpadded."""
        return [row[:n].tolist() for row, n in zip(self.completion_ids, self.lengths.tolist())]

    def training_batch(self, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The rows as a GRPO trainer lays them out: prompts left-padded, completions right-padded, one tensor.

        Returns ids (R, Tp + Tc), attention mask (R, Tp + Tc) and Tp (completion tokens start at column Tp).
        """
        prompts, comps = self.prompt_ids, self.completions()
        Tp, Tc = max(map(len, prompts)), max(map(len, comps))
        ids = torch.full((len(prompts), Tp + Tc), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, c) in enumerate(zip(prompts, comps)):
            ids[r, Tp - len(p) : Tp] = torch.tensor(p)
            ids[r, Tp : Tp + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, Tp - len(p) : Tp + len(c)] = 1
        return ids, mask, Tp


def find_hybrid(model: torch.nn.Module) -> HybridForCausalLM | None:
    """The HybridForCausalLM inside `model` (plain, PEFT-wrapped or accelerate/DeepSpeed-wrapped), or None.

    PEFT injects its adapters into the base model's layers, so the bare HybridForCausalLM includes them."""
    seen = model
    for _ in range(4):
        if isinstance(seen, HybridForCausalLM):
            return seen
        if hasattr(seen, "get_base_model"):
            seen = seen.get_base_model()
        elif hasattr(seen, "module"):
            seen = seen.module
        else:
            return None
    return None


class RolloutEngine:
    """Fast batched sampling from an `HybridForCausalLM` (see the module docstring).

    >>> engine = RolloutEngine(model, pad_token_id=0, budget=RolloutBudget(max_rows=4))
    >>> out = engine.generate([[5, 6, 7], [8, 9]], num_generations=4, params=SamplingParams(max_new_tokens=16))
    >>> out.completion_ids.shape[0]
    8
    """

    def __init__(
        self,
        model: HybridForCausalLM,
        pad_token_id: int,
        compact_fraction: float = COMPACT_FRACTION,
        decode: str = "auto",
        budget: RolloutBudget | None = None,
        synced: bool | None = None,
    ):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if not isinstance(model, HybridForCausalLM):
            raise TypeError(
                f"RolloutEngine needs an h1rl HybridForCausalLM, got {type(model).__name__}; "
                "convert a transformer with h1rl.models.convert.convert_teacher (an all-'t' layout is exact)"
            )
        self.model = model
        self.pad_token_id = pad_token_id
        self.compact_fraction = compact_fraction
        self.decode = decode
        self.budget = budget or RolloutBudget()
        self.synced = synced  # None: decided per call (see `is_synced`)

    def decode_mode(self) -> str:
        """The decode step `generate` uses for the model where it is now ("auto" resolved)."""
        reason = graphs_unsupported_reason(self.model)
        if self.decode == "auto":
            return "eager"  # "cuda_graph" on CUDA once the GPU check has validated it (see the module docstring)
        if self.decode == "cuda_graph" and reason is not None:
            raise ValueError(f"decode='cuda_graph' is not possible: {reason}; use decode='auto', 'eager' or 'static'")
        return self.decode

    def is_synced(self) -> bool:
        """Whether every process must make the same model calls: several processes and weights managed by ZeRO-3
        (unless `synced` was given). Gathered for generation, the weights need no calls in step, and syncing then
        costs one all-reduce per call; left partitioned, a call that another process does not make hangs both."""
        if self.synced is not None:
            return self.synced
        dist = torch.distributed
        return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and zero3_managed(self.model))

    def plan_rows(self, rows: int, prompt_len: int, max_len: int, rows_per_prompt: float = 1.0) -> int:
        """Slots: rows decoded at once within the budget (at most `rows`); an error names the budget when not one
        row fits."""
        limit = min(rows, self.budget.max_rows or rows)
        budget, source = memory_budget(self.budget, self.model.device)
        if budget is None:
            return limit
        dtype_bytes = self.model.lm_head.weight.element_size()
        per_row = bytes_per_row(self.model.config, max_len, prompt_len, self.budget.prefill_chunk, dtype_bytes,
                                rows_per_prompt)
        fits = int(budget // per_row)
        if fits < 1:
            raise ValueError(
                f"the rollout budget ({source}: {budget / 2**30:.2f} GiB) holds no row: one row of {prompt_len} "
                f"prompt + {max_len - prompt_len} new tokens needs {per_row / 2**30:.2f} GiB; raise the budget "
                "(rollout memory_gb) or lower max_completion_length"
            )
        return min(limit, fits)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int | list[int] = 1,
        params: SamplingParams | None = None,
        resumed: list[ResumedRow] | None = None,
        decode_budget: int | None = None,
        on_finished: Callable[[list[int], list[list[int]]], None] | None = None,
    ) -> Rollout:
        """Sample `num_generations` completions of each prompt (one count for all, or one per prompt), after
        continuing the `resumed` rows (output rows: the resumed ones first, then G per prompt). With `decode_budget`
        at most that many decode steps run: rows still running then are returned unfinished ("partial").
        `on_finished(rows, completion_ids)` is called as rows finish, while the others still decode (the GRPO trainer
        starts scoring them there)."""
        params = params or SamplingParams()
        self._check_prompts(prompts, allow_none=resumed is not None)
        counts = [num_generations] * len(prompts) if isinstance(num_generations, int) else list(num_generations)
        if len(counts) != len(prompts) or (counts and min(counts) < 1):
            raise ValueError(f"num_generations must be a positive int or one positive count per prompt, got {counts}")
        if decode_budget is not None and decode_budget < 0:
            raise ValueError(f"decode_budget must be >= 0 (or None), got {decode_budget}")
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)).item())
        plans, units = row_plans(prompts, counts, params, seed, list(resumed or []))
        if not plans:  # nothing to do here; synced, the call still makes a scratch call per round of the others
            return self._drive(_nothing(params.max_new_tokens))
        return self._drive(Phase(self, plans, units, params, decode_budget, on_finished).run())

    # ---- driving the model calls ---------------------------------------------------------------------------

    def _drive(self, work: Generator[Call, torch.Tensor, Rollout]) -> Rollout:
        """Run the model calls `work` asks for; when synced, every process makes one call per round (its own, or a
        one-token call on a scratch cache) until no process has work left."""
        synced = self.is_synced()
        rollout, request = None, None
        try:
            request = next(work)
        except StopIteration as stop:
            rollout = stop.value
        while True:
            busy = request is not None
            if synced:
                busy_anywhere = self._any_process(busy)
                if not busy_anywhere:
                    break
                if not busy:
                    self._scratch_call()
                    continue
            elif not busy:
                break
            _, call = request
            result = call()
            try:
                request = work.send(result)
            except StopIteration as stop:
                rollout, request = stop.value, None
        return rollout

    def _any_process(self, busy: bool) -> bool:
        dist = torch.distributed
        device = torch.device("cpu") if dist.get_backend() == "gloo" else self.model.device
        flag = torch.tensor([1 if busy else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, cache: HybridCache, pick_rows: torch.Tensor,
                 pick_cols: torch.Tensor, **kwargs) -> torch.Tensor:
        """One model call: the decoder layers over ids (n, T) continuing `cache`, then the LM head at the positions
        (pick_rows[i], pick_cols[i]): logits (k, V). Prefill, decode and scratch calls all take this module path."""
        hidden = self.model.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
                                  **kwargs).last_hidden_state  # (n, T, D)
        return self.model.lm_head(hidden[pick_rows, pick_cols])  # (k, V)

    def _scratch_call(self) -> None:
        device = self.model.device
        one = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        self._forward(one, None, self.model.allocate_cache(1, 1), zero, zero)

    # ---- prefill --------------------------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]]) -> Generator[Call, torch.Tensor, tuple[HybridCache, torch.Tensor,
                                                                                       list[int]]]:
        """Prefill `prompts` into a fresh cache of their own, `prefill_chunk` tokens per row per call, each chunk
        continuing from the cache. Returns the cache (one row per prompt, longest first), the logits (U, V) at each
        prompt's last token (in the given order) and the cache row of each prompt."""
        model, device, pad = self.model, self.model.device, self.pad_token_id
        U = len(prompts)
        order = sorted(range(U), key=lambda u: -len(prompts[u]))  # longest first: a chunk's rows are a prefix
        lens = [len(prompts[u]) for u in order]
        L = lens[0]
        ids = torch.full((U, L), pad, dtype=torch.long, device=device)
        mask = torch.zeros(U, L, dtype=torch.long, device=device)
        for i, u in enumerate(order):  # left-aligned: tokens from column 0, pads after them
            ids[i, : lens[i]] = torch.tensor(prompts[u], dtype=torch.long, device=device)
            mask[i, : lens[i]] = 1
        cache = model.allocate_cache(U, L)
        logits = None
        C = self.budget.prefill_chunk
        for c0 in range(0, L, C):
            c1 = min(c0 + C, L)
            m = sum(length > c0 for length in lens)  # rows with tokens in this chunk
            view = cache.narrow(m)
            view.set_length(c0)
            ending = [i for i in range(m) if lens[i] <= c1]  # rows whose last token is in this chunk
            pick_rows = torch.tensor(ending, dtype=torch.long, device=device)
            pick_cols = torch.tensor([lens[i] - 1 - c0 for i in ending], dtype=torch.long, device=device)
            chunk_mask = None if lens[m - 1] >= c1 else mask[:m, :c1]  # pads only after a row's last token
            out = yield ("prefill", lambda m=m, c0=c0, c1=c1, view=view, chunk_mask=chunk_mask, pick_rows=pick_rows,
                         pick_cols=pick_cols: self._forward(ids[:m, c0:c1], chunk_mask, view, pick_rows, pick_cols))
            if logits is None:
                logits = out.new_empty(U, out.shape[-1])
            logits[ending] = out
        cache.set_length(L)
        row_of = [0] * U  # prompt u is row row_of[u] of the cache
        for i, u in enumerate(order):
            row_of[u] = i
        return cache, logits[row_of], row_of

    def _check_prompts(self, prompts: list[list[int]], allow_none: bool = False) -> None:
        if not prompts and not allow_none:
            raise ValueError("no prompts given (pass resumed=[] explicitly for a call with no rows, e.g. to keep "
                             "synced processes in step)")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [tok for tok in p if not 0 <= int(tok) < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def _nothing(max_new_tokens: int) -> Generator[Call, torch.Tensor, Rollout]:
    """A phase with no rows: no model call of its own."""
    empty = torch.zeros(0, 1, dtype=torch.long)
    return Rollout([], empty, empty.float(), torch.zeros(0, dtype=torch.long), [], origins=[],
                   resumed_lengths=torch.zeros(0, dtype=torch.long))
    yield  # a generator
