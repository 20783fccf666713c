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

Rows are prompt-major: output row r * G + g is completion g of prompt r.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from h1rl.models.cache import HybridCache
from h1rl.models.configuration import HybridConfig
from h1rl.models.modeling import HybridForCausalLM
from h1rl.rollout.decode_step import StaticDecoder, graphs_unsupported_reason, zero3_managed
from h1rl.rollout.sampling import SamplingParams, sample_next

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
    finish_reasons: list[str]  # R: "stop" (emitted a stop token) or "length" (reached max_new_tokens)
    stats: dict[str, float] = field(default_factory=dict)  # prefill/decode seconds, tokens, tokens per second

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


class Uniforms:
    """One U(0, 1) per (token index t, row r) of a seeded stream, drawn in token order: `stream_rows` draws per token
    index, of which this call's rows take those from `stream_offset` on (see `SamplingParams`). Filled lazily."""

    def __init__(self, params: SamplingParams, rows: int, device: torch.device):
        self.stream = params.stream_rows if params.stream_rows is not None else rows
        if params.stream_offset + rows > self.stream:
            raise ValueError(
                f"rows {params.stream_offset}..{params.stream_offset + rows - 1} of this call do not fit in the "
                f"sampling stream of {self.stream} rows (SamplingParams.stream_rows / stream_offset)"
            )
        self.offset, self.rows, self.device = params.stream_offset, rows, device
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)).item())
        self.generator.manual_seed(seed)
        self.table = torch.empty(params.max_new_tokens, rows, device=device)  # (max_new, R)
        self.filled = 0

    def get(self, t: torch.Tensor, rows: torch.Tensor, upto: int) -> torch.Tensor:
        """Uniforms (m,) of token indices t (m,) (each <= `upto`; larger ones, of finished rows, are clamped) of
        rows (m,)."""
        while self.filled <= min(upto, self.table.shape[0] - 1):
            draw = torch.rand(self.stream, generator=self.generator, device=self.device)
            self.table[self.filled] = draw[self.offset : self.offset + self.rows]
            self.filled += 1
        return self.table[t.clamp(max=self.table.shape[0] - 1), rows]


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
    ) -> Rollout:
        """Sample `num_generations` completions of each prompt (one count for all, or one per prompt)."""
        params = params or SamplingParams()
        self._check_prompts(prompts)
        counts = [num_generations] * len(prompts) if isinstance(num_generations, int) else list(num_generations)
        if len(counts) != len(prompts) or min(counts) < 1:
            raise ValueError(f"num_generations must be a positive int or one positive count per prompt, got {counts}")
        return self._drive(self._rollout(prompts, counts, params))

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

    # ---- one rollout phase ------------------------------------------------------------------------------

    def _rollout(self, prompts: list[list[int]], counts: list[int],
                 params: SamplingParams) -> Generator[Call, torch.Tensor, Rollout]:
        model, device, pad = self.model, self.model.device, self.pad_token_id
        R, max_new = sum(counts), params.max_new_tokens
        row_prompt = [p for p, g in enumerate(counts) for _ in range(g)]  # prompt of each output row
        lens = [len(p) for p in prompts]
        S = max(lens) + max_new  # KV columns of a slot
        slots = self.plan_rows(R, max(lens), S, R / len(prompts))
        mode = self.decode_mode()
        decoder = StaticDecoder(model, slots, S, use_cuda_graphs=mode == "cuda_graph")
        uniforms = Uniforms(params, R, device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        penalised = params.repetition_penalty != 1
        # ids seen per slot, for the repetition penalty; -1 (ignored) beyond each row's tokens, never the pad id
        history = torch.full((slots, S), -1, dtype=torch.long, device=device) if penalised else None
        completion = torch.full((R, max_new), pad, dtype=torch.long, device=device)
        logprobs = torch.zeros(R, max_new, dtype=torch.float32, device=device)
        lengths = torch.zeros(R, dtype=torch.long, device=device)
        stopped = torch.zeros(R, dtype=torch.bool, device=device)
        # the active batch is slots 0..n-1; slot i holds output row rows[i], whose t[i] tokens are sampled, whose
        # next input is tokens[i] at column col[i]; a finished row (done) keeps its slot until refilled or compacted
        rows, t, col, tokens = (torch.zeros(slots, dtype=torch.long, device=device) for _ in range(4))
        done = torch.ones(slots, dtype=torch.bool, device=device)
        n, next_row, max_col, t_hi = 0, 0, 0, 0
        held: tuple[int, HybridCache, torch.Tensor] | None = None  # (prompt, its 1-row state, its logits)
        timing = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_calls": 0, "prompts_prefilled": 0, "decode_steps": 0}

        def take(logits: torch.Tensor, idx: torch.Tensor) -> None:
            """Sample the next token of the rows in slots idx (m,) from logits (m, V); record it for active rows."""
            r, tt, active = rows[idx], t[idx], ~done[idx]
            hist = None if history is None else history[idx, : max_col + 1]
            tok, lp = sample_next(logits, params, uniforms.get(tt, r, t_hi), hist)  # (m,), (m,)
            tok = torch.where(active, tok, pad)
            at = (r, tt.clamp(max=max_new - 1))
            completion.index_put_(at, torch.where(active, tok, completion[at]))
            logprobs.index_put_(at, torch.where(active, lp, logprobs[at]))
            lengths.index_add_(0, r, active.long())
            hit = torch.isin(tok, stop_ids) & active if stop_ids.numel() else torch.zeros_like(active)
            stopped.index_put_((r,), stopped[r] | hit)
            t[idx] = tt + active.long()
            done[idx] = done[idx] | hit | (t[idx] >= max_new)
            tokens[idx] = tok
            if history is not None:
                history.index_put_((idx, col[idx]), torch.where(active, tok, history[idx, col[idx]]))

        while True:
            # 1. admit waiting rows into free slots: finished ones first, then those past n
            while next_row < R:
                free = done[:n].nonzero()[:, 0].tolist() + list(range(n, slots))
                if not free:
                    break
                start = time.perf_counter()
                k = min(len(free), R - next_row)
                admitted = list(range(next_row, next_row + k))
                dst = torch.tensor(free[:k], device=device)
                distinct = [p for i, p in enumerate(row_prompt[next_row : next_row + k])
                            if i == 0 or p != row_prompt[next_row + i - 1]]
                reuse = held is not None and held[0] == distinct[0]
                fresh = distinct[1:] if reuse else distinct
                first_logits = {}  # prompt -> (its state's cache, row in it, columns to copy, its logits)
                if reuse:
                    first_logits[held[0]] = (held[1], 0, lens[held[0]], held[2][0])
                if fresh:
                    cache, logits, row_of = yield from self._prefill([prompts[p] for p in fresh], params)
                    timing["prefill_calls"] += -(-max(lens[p] for p in fresh) // self.budget.prefill_chunk)
                    timing["prompts_prefilled"] += len(fresh)
                    for u, p in enumerate(fresh):
                        first_logits[p] = (cache, row_of[u], max(lens[q] for q in fresh), logits[u])
                for p in distinct:  # each prompt's state into its rows' slots
                    src_cache, u, cols, _ = first_logits[p]
                    mine = [i for i, r in enumerate(admitted) if row_prompt[r] == p]
                    decoder.cache.copy_rows_(dst[mine], src_cache, torch.full((len(mine),), u, device=device), cols)
                last = distinct[-1]  # keep the last prompt's state if some of its rows still wait
                if next_row + k < R and row_prompt[next_row + k] == last:
                    src_cache, u, _, last_logits = first_logits[last]
                    held = (last, src_cache.index_select(torch.tensor([u], device=device)), last_logits[None])
                else:
                    held = None
                prompt_len = torch.tensor([lens[row_prompt[r]] for r in admitted], device=device)
                rows[dst] = torch.tensor(admitted, device=device)
                t[dst], col[dst], done[dst] = 0, prompt_len, False
                if history is not None:
                    history[dst] = -1
                    for i, r in enumerate(admitted):
                        history[dst[i], : lens[row_prompt[r]]] = torch.tensor(prompts[row_prompt[r]], device=device)
                next_row += k
                n = max(n, int(dst.max()) + 1)
                max_col = max(max_col, int(prompt_len.max()))
                take(torch.stack([first_logits[row_prompt[r]][3] for r in admitted]), dst)
                timing["prefill_s"] += time.perf_counter() - start
            if not bool((~done[:n]).any()):
                break  # nothing active, nothing waiting
            # 2. one decode step for slots 0..n-1
            start = time.perf_counter()
            num_keys = S if mode == "static" else max_col + 1
            every = torch.arange(n, device=device)
            logits = yield ("decode", lambda n=n, num_keys=num_keys, every=every: decoder.step(
                tokens[:n], col[:n], col[:n], num_keys))
            col[:n] += (~done[:n]).long()
            max_col, t_hi = min(max_col + 1, S - 1), min(t_hi + 1, max_new - 1)
            take(logits, every)
            timing["decode_steps"] += 1
            # 3. with nothing waiting, move the unfinished rows to the front once enough have finished
            if next_row == R:
                finished = int(done[:n].sum())
                if finished >= max(1, int(self.compact_fraction * n)) and finished < n:
                    keep = (~done[:n]).nonzero()[:, 0]  # ascending slots
                    m = keep.numel()
                    front = torch.arange(m, device=device)
                    decoder.cache.copy_rows_(front, decoder.cache, keep, max_col + 1)
                    for buf in (rows, t, col, tokens, done) + (() if history is None else (history,)):
                        buf[:m] = buf[keep]
                    done[m:n] = True
                    n = m
                    max_col = int(col[:n].max())
            timing["decode_s"] += time.perf_counter() - start

        generated = int(lengths.sum())
        L = max(int(lengths.max()), 1) if R else 1
        total_s = timing["prefill_s"] + timing["decode_s"]
        kv_per_token = sum(2 * s.key.shape[1] * s.key.shape[3] * s.key.element_size()
                           for s in decoder.cache.layers if hasattr(s, "key"))
        mamba = sum(s.nbytes() for s in decoder.cache.layers if s is not None and not hasattr(s, "key")) // slots
        mean_tokens = (sum(lens[p] for p in row_prompt) + generated) / R
        return Rollout(
            prompt_ids=[list(prompts[p]) for p in row_prompt],
            completion_ids=completion[:, :L].cpu(),
            logprobs=logprobs[:, :L].cpu(),
            lengths=lengths.cpu(),
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
            stats={
                **{k: float(v) for k, v in timing.items()},
                "generated_tokens": float(generated),
                "tokens_per_s": generated / max(total_s, 1e-9),
                "rows_at_once": float(slots),
                "state_bytes_per_seq": float(mamba + kv_per_token * mean_tokens),  # Mamba state + KV, mean row
                "graph_capture_s": decoder.capture_s,  # inside decode_s
            },
        )

    def _prefill(self, prompts: list[list[int]],
                 params: SamplingParams) -> Generator[Call, torch.Tensor, tuple[HybridCache, torch.Tensor, list[int]]]:
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

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [tok for tok in p if not 0 <= int(tok) < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
