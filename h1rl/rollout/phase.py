"""One rollout phase of `h1rl.rollout.RolloutEngine`: slots, waiting rows, admission, decode steps, results.

`Phase.run()` is a generator of model calls (the engine's driver makes them, and keeps processes in step when
synced): it admits waiting rows into free slots (prefilling their distinct prompts in chunks), runs decode steps
over the occupied slots, refills or compacts the slots of finished rows, and returns the `Rollout`. See the engine's
module docstring for the layout (left-aligned rows in slots, per-row KV columns) and the budget.

Rows come in two kinds, in this order in the output:
- resumed rows (`ResumedRow`): rows an earlier phase set aside unfinished (finish reason "partial", under a decode
  budget). A resumed row is continued from its tokens: its prompt and completion so far are prefilled by the current
  model (the old model's state would not be the current model's), its last sampled token is fed at the first decode
  step, and its next tokens use the uniforms of the stream it was started from. Under an unchanged model it therefore
  continues exactly as it would have in one go (`tests/rollout/test_engine.py`); its earlier tokens keep the
  log-probs of the model that sampled them (`Rollout.resumed_lengths` says how many).
- fresh rows: G completions of each prompt, prompt-major.

Uniforms: row r's t-th token uses the uniform at (t, r) of one seeded stream (`Uniforms`), drawn in token order,
whatever the slot, step or budget; a stream is (seed, rows per draw), and a row is one index into it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from h1rl.models.cache import HybridCache
from h1rl.rollout.sampling import SamplingParams, sample_next

Origin = tuple[int, int, int]  # (seed, rows per draw, index of the row in the draw): where a row's uniforms come from


@dataclass
class ResumedRow:
    """A row set aside unfinished by an earlier rollout phase, to be continued (see the module docstring)."""

    prompt: list[int]
    completion: list[int]  # the tokens sampled so far (none for a row the budget left waiting)
    logprobs: list[float]  # their log-probs under the model that sampled them
    origin: Origin  # the uniform stream it was started from (`Rollout.origins`)


@dataclass
class RowPlan:
    """What the phase knows of one output row before it starts."""

    prompt: list[int]
    unit: int  # the prefill unit (distinct prefill ids) it is admitted from
    origin: Origin
    resumed: list[int]  # tokens sampled before this phase (resumed rows), else []
    resumed_logprobs: list[float]


class Uniforms:
    """One U(0, 1) per (token index t, row) for rows of several streams: a stream (seed, rows per draw) draws its
    `rows per draw` uniforms per token index in order, and each of its rows takes its own index. Filled lazily."""

    def __init__(self, origins: list[Origin], max_new: int, device: torch.device):
        self.device = device
        self.table = torch.empty(max_new, len(origins), device=device)  # (max_new, R)
        self.streams = {}  # (seed, rows per draw) -> [generator, filled, table columns, indices in the draw]
        for r, (seed, stream_rows, index) in enumerate(origins):
            if not 0 <= index < stream_rows:
                raise ValueError(f"row {r}: index {index} is outside its sampling stream of {stream_rows} rows")
            if (seed, stream_rows) not in self.streams:
                generator = torch.Generator(device=device)
                generator.manual_seed(seed)
                self.streams[seed, stream_rows] = [generator, 0, [], []]
            self.streams[seed, stream_rows][2].append(r)
            self.streams[seed, stream_rows][3].append(index)
        for stream in self.streams.values():
            stream[2], stream[3] = (torch.tensor(v, device=device) for v in stream[2:])

    def get(self, t: torch.Tensor, rows: torch.Tensor, upto: int) -> torch.Tensor:
        """Uniforms (m,) of token indices t (m,) (each <= `upto`; larger ones, of finished rows, are clamped) of
        rows (m,)."""
        last = min(upto, self.table.shape[0] - 1)
        for (_, stream_rows), stream in self.streams.items():
            generator, filled, columns, indices = stream
            while filled <= last:
                draw = torch.rand(stream_rows, generator=generator, device=self.device)
                self.table[filled, columns] = draw[indices]
                filled += 1
            stream[1] = filled
        return self.table[t.clamp(max=self.table.shape[0] - 1), rows]


def row_plans(prompts: list[list[int]], counts: list[int], params: SamplingParams, seed: int,
              resumed: list[ResumedRow]) -> tuple[list[RowPlan], list[list[int]]]:
    """The output rows (resumed first, then G per prompt) and the prefill units: a resumed row prefills its prompt
    and its completion but for the last token (which its first decode step feeds); a prompt's fresh rows share one."""
    stream = params.stream_rows if params.stream_rows is not None else sum(counts)
    if params.stream_offset + sum(counts) > stream:
        raise ValueError(
            f"rows {params.stream_offset}..{params.stream_offset + sum(counts) - 1} of this call do not fit in the "
            f"sampling stream of {stream} rows (SamplingParams.stream_rows / stream_offset)"
        )
    plans, units = [], []
    for i, row in enumerate(resumed):
        if len(row.completion) != len(row.logprobs):
            raise ValueError(f"resumed row {i}: one log-prob per completion token is needed, got "
                             f"{len(row.completion)} tokens and {len(row.logprobs)} log-probs")
        if len(row.completion) >= params.max_new_tokens:
            raise ValueError(f"resumed row {i} already has {len(row.completion)} tokens, max_new_tokens is "
                             f"{params.max_new_tokens}: it is finished")
        units.append(list(row.prompt) + list(row.completion[:-1]))  # a row never started: its prompt alone
        plans.append(RowPlan(list(row.prompt), len(units) - 1, tuple(row.origin), list(row.completion),
                             list(row.logprobs)))
    index = params.stream_offset
    for p, g in zip(prompts, counts):
        units.append(list(p))
        for _ in range(g):
            plans.append(RowPlan(list(p), len(units) - 1, (seed, stream, index), [], []))
            index += 1
    return plans, units


class Phase:
    """The state of one rollout phase (see the module docstring); `run()` yields its model calls."""

    def __init__(self, engine, plans: list[RowPlan], units: list[list[int]], params: SamplingParams,
                 decode_budget: int | None, on_finished: Callable[[list[int], list[list[int]]], None] | None = None):
        from h1rl.rollout.decode_step import StaticDecoder

        self.engine, self.plans, self.units, self.params = engine, plans, units, params
        self.decode_budget = decode_budget
        self.on_finished = on_finished
        model, device, pad = engine.model, engine.model.device, engine.pad_token_id
        self.device, self.pad = device, pad
        R, max_new = len(plans), params.max_new_tokens
        self.R, self.max_new = R, max_new
        prompt_lens = [len(p.prompt) for p in plans]
        self.S = S = max(prompt_lens) + max_new  # KV columns of a slot
        self.slots = slots = engine.plan_rows(R, max(prompt_lens), S, R / len(units))
        self.mode = engine.decode_mode()
        self.decoder = StaticDecoder(model, slots, S, use_cuda_graphs=self.mode == "cuda_graph")
        self.uniforms = Uniforms([p.origin for p in plans], max_new, device)
        self.stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        # ids seen per slot, for the repetition penalty; -1 (ignored) beyond each row's tokens, never the pad id
        penalised = params.repetition_penalty != 1
        self.history = torch.full((slots, S), -1, dtype=torch.long, device=device) if penalised else None
        self.completion = torch.full((R, max_new), pad, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(R, max_new, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(R, dtype=torch.long, device=device)
        self.stopped = torch.zeros(R, dtype=torch.bool, device=device)
        self.started = torch.zeros(R, dtype=torch.bool, device=device)
        # the active batch is slots 0..n-1; slot i holds output row rows[i], whose t[i] tokens are sampled, whose
        # next input is tokens[i] at column col[i]; a finished row (done) keeps its slot until refilled or compacted
        self.rows, self.t, self.col, self.tokens = (torch.zeros(slots, dtype=torch.long, device=device)
                                                    for _ in range(4))
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.n, self.next_row, self.max_col, self.t_hi = 0, 0, 0, 0
        self.held: tuple[int, HybridCache, torch.Tensor] | None = None  # (unit, its 1-row state, its logits)
        self.timing = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_calls": 0, "prompts_prefilled": 0,
                       "decode_steps": 0}

    def run(self) -> Generator:
        while True:
            yield from self._admit()
            if not bool((~self.done[: self.n]).any()):
                break  # nothing active, nothing waiting
            if self.decode_budget is not None and self.timing["decode_steps"] >= self.decode_budget:
                break  # the budget is spent: the unfinished rows are set aside ("partial")
            yield from self._decode_step()
            if self.next_row == self.R:
                self._compact()
        return self._result()

    # ---- sampling -------------------------------------------------------------------------------------------

    def _take(self, logits: torch.Tensor, idx: torch.Tensor) -> None:
        """Sample the next token of the rows in slots idx (m,) from logits (m, V); record it for active rows."""
        rows, t, done, history = self.rows, self.t, self.done, self.history
        r, tt, active = rows[idx], t[idx], ~done[idx]
        hist = None if history is None else history[idx, : self.max_col + 1]
        uniforms = self.uniforms.get(tt, r, self.t_hi)
        tok, lp = sample_next(logits, self.params, uniforms, hist)  # (m,), (m,)
        tok = torch.where(active, tok, self.pad)
        at = (r, tt.clamp(max=self.max_new - 1))
        self.completion.index_put_(at, torch.where(active, tok, self.completion[at]))
        self.logprobs.index_put_(at, torch.where(active, lp, self.logprobs[at]))
        self.lengths.index_add_(0, r, active.long())
        hit = torch.isin(tok, self.stop_ids) & active if self.stop_ids.numel() else torch.zeros_like(active)
        self.stopped.index_put_((r,), self.stopped[r] | hit)
        t[idx] = tt + active.long()
        finished = active & (hit | (t[idx] >= self.max_new))
        done[idx] = done[idx] | finished
        self.tokens[idx] = tok
        if history is not None:
            col = self.col[idx]
            history.index_put_((idx, col), torch.where(active, tok, history[idx, col]))
        if self.on_finished is not None and bool(finished.any()):
            ended = r[finished].tolist()  # output rows that finished at this token
            ids = self.completion[ended].cpu()
            self.on_finished(ended, [ids[i, :n].tolist() for i, n in enumerate(self.lengths[ended].tolist())])

    # ---- admission ------------------------------------------------------------------------------------------

    def _admit(self) -> Generator:
        """Admit waiting rows into free slots (finished ones first, then those past n), as long as both remain."""
        while self.next_row < self.R:
            free = self.done[: self.n].nonzero()[:, 0].tolist() + list(range(self.n, self.slots))
            if not free:
                return
            start = time.perf_counter()
            k = min(len(free), self.R - self.next_row)
            admitted = list(range(self.next_row, self.next_row + k))
            yield from self._admit_rows(admitted, torch.tensor(free[:k], device=self.device))
            self.timing["prefill_s"] += time.perf_counter() - start

    def _admit_rows(self, admitted: list[int], dst: torch.Tensor) -> Generator:
        plans, device, units = self.plans, self.device, self.units
        unit_of = [plans[r].unit for r in admitted]
        distinct = [u for i, u in enumerate(unit_of) if i == 0 or u != unit_of[i - 1]]
        reuse = self.held is not None and self.held[0] == distinct[0]
        fresh = distinct[1:] if reuse else distinct
        state = {}  # unit -> (the cache holding its state, row in it, columns to copy, its last logits)
        if reuse:
            state[self.held[0]] = (self.held[1], 0, len(units[self.held[0]]), self.held[2][0])
        if fresh:
            cache, logits, row_of = yield from self.engine._prefill([units[u] for u in fresh])
            self.timing["prefill_calls"] += -(-max(len(units[u]) for u in fresh) // self.engine.budget.prefill_chunk)
            self.timing["prompts_prefilled"] += len(fresh)
            for i, u in enumerate(fresh):
                state[u] = (cache, row_of[i], max(len(units[v]) for v in fresh), logits[i])
        for u in distinct:  # each unit's state into its rows' slots
            src_cache, row, cols, _ = state[u]
            mine = [i for i, v in enumerate(unit_of) if v == u]
            self.decoder.cache.copy_rows_(dst[mine], src_cache, torch.full((len(mine),), row, device=device), cols)
        last, after = distinct[-1], admitted[-1] + 1  # keep the last unit's state if some of its rows still wait
        if after < self.R and plans[after].unit == last:
            src_cache, row, _, last_logits = state[last]
            self.held = (last, src_cache.index_select(torch.tensor([row], device=device)), last_logits[None])
        else:
            self.held = None
        self.next_row = after
        self._start_rows(admitted, dst, [state[u][3] for u in unit_of])

    def _start_rows(self, admitted: list[int], dst: torch.Tensor, unit_logits: list[torch.Tensor]) -> None:
        """Slot bookkeeping of admitted rows; a fresh row samples its first token from its prompt's logits, a resumed
        row gets its tokens so far and feeds its last one at the next decode step."""
        plans, device = self.plans, self.device
        self.rows[dst] = torch.tensor(admitted, device=device)
        self.started[self.rows[dst]] = True
        self.done[dst] = False
        for i, r in enumerate(admitted):
            plan, slot = plans[r], dst[i]
            unit = self.units[plan.unit]
            self.col[slot] = len(unit)  # a fresh row's first token, a resumed row's last one, goes after the unit
            self.t[slot] = len(plan.resumed)
            if plan.resumed:
                n = len(plan.resumed)
                self.completion[r, :n] = torch.tensor(plan.resumed, device=device)
                self.logprobs[r, :n] = torch.tensor(plan.resumed_logprobs, device=device)
                self.lengths[r] = n
                self.tokens[slot] = plan.resumed[-1]
            if self.history is not None:
                self.history[slot] = -1
                self.history[slot, : len(unit)] = torch.tensor(unit, device=device)
                if plan.resumed:
                    self.history[slot, len(unit)] = plan.resumed[-1]
        self.n = max(self.n, int(dst.max()) + 1)
        self.max_col = max(self.max_col, int(self.col[dst].max()))
        self.t_hi = max(self.t_hi, max(len(plans[r].resumed) for r in admitted))
        fresh = [i for i, r in enumerate(admitted) if not plans[r].resumed]
        if fresh:
            self._take(torch.stack([unit_logits[i] for i in fresh]), dst[fresh])

    # ---- decoding ---------------------------------------------------------------------------------------------

    def _decode_step(self) -> Generator:
        """One decode step for slots 0..n-1: feed each row's token, sample its next one."""
        start = time.perf_counter()
        n, col = self.n, self.col
        num_keys = self.S if self.mode == "static" else self.max_col + 1
        logits = yield ("decode", lambda: self.decoder.step(self.tokens[:n], col[:n], col[:n], num_keys))
        col[:n] += (~self.done[:n]).long()
        self.max_col, self.t_hi = min(self.max_col + 1, self.S - 1), min(self.t_hi + 1, self.max_new - 1)
        self._take(logits, torch.arange(n, device=self.device))
        self.timing["decode_steps"] += 1
        self.timing["decode_s"] += time.perf_counter() - start

    def _compact(self) -> None:
        """With nothing waiting, move the unfinished rows to the front once enough have finished."""
        n, done = self.n, self.done
        finished = int(done[:n].sum())
        if not (max(1, int(self.engine.compact_fraction * n)) <= finished < n):
            return
        keep = (~done[:n]).nonzero()[:, 0]  # ascending slots
        m = keep.numel()
        self.decoder.cache.copy_rows_(torch.arange(m, device=self.device), self.decoder.cache, keep, self.max_col + 1)
        for buf in (self.rows, self.t, self.col, self.tokens, done) + (() if self.history is None else
                                                                          (self.history,)):
            buf[:m] = buf[keep]
        done[m:n] = True
        self.n = m
        self.max_col = int(self.col[:m].max())

    # ---- the result -------------------------------------------------------------------------------------------

    def _result(self):
        from h1rl.rollout.engine import Rollout

        lengths, R = self.lengths, self.R
        unfinished = torch.zeros(R, dtype=torch.bool, device=self.device)
        active = ~self.done[: self.n]
        unfinished[self.rows[: self.n][active]] = True
        unfinished |= ~self.started  # never admitted before the budget ran out
        reasons = ["partial" if u else "stop" if s else "length"
                   for u, s in zip(unfinished.tolist(), self.stopped.tolist())]
        resumed = torch.tensor([len(p.resumed) for p in self.plans], dtype=torch.long)
        generated = int(lengths.sum()) - int(resumed.sum())
        L = max(int(lengths.max()), 1)
        timing = self.timing
        total_s = timing["prefill_s"] + timing["decode_s"]
        cache = self.decoder.cache
        kv_per_token = sum(2 * s.key.shape[1] * s.key.shape[3] * s.key.element_size()
                           for s in cache.layers if hasattr(s, "key"))
        mamba = sum(s.nbytes() for s in cache.layers if s is not None and not hasattr(s, "key")) // self.slots
        mean_tokens = (sum(len(p.prompt) for p in self.plans) + int(lengths.sum())) / R
        return Rollout(
            prompt_ids=[list(p.prompt) for p in self.plans],
            completion_ids=self.completion[:, :L].cpu(),
            logprobs=self.logprobs[:, :L].cpu(),
            lengths=lengths.cpu(),
            finish_reasons=reasons,
            origins=[p.origin for p in self.plans],
            resumed_lengths=resumed,
            stats={
                **{k: float(v) for k, v in timing.items()},
                "generated_tokens": float(generated),
                "tokens_per_s": generated / max(total_s, 1e-9),
                "rows_at_once": float(self.slots),
                "state_bytes_per_seq": float(mamba + kv_per_token * mean_tokens),  # Mamba state + KV, mean row
                "graph_capture_s": self.decoder.capture_s,  # inside decode_s
            },
        )
