"""One decode step of a hybrid model over rows of different lengths, eager or replayed as CUDA graphs.

`StaticDecoder` owns the decode buffers of a rollout phase and runs one token per row with static shapes and no host
synchronisation:

- `cache`: a `HybridCache` of `batch_size` rows (the engine's slots) whose KV buffers hold `max_len` columns, never
  reallocated. Each row writes its own column (rows start at column 0 and have different lengths);
- `tokens`, `positions`, `columns` (batch_size,) long: each row's input token, its RoPE position and the KV column it
  writes (equal to the position for the engine's left-aligned rows; they differ under left padding);
- `key_valid` (batch_size, max_len) bool: columns that hold real tokens (all True for left-aligned rows; the caller
  marks prompt padding False). Causality comes from `columns`, so columns not written yet may be True.

One step, for the first n rows over the first `num_keys` columns: `HybridModel.forward` with
`h1rl.models.batch.DecodeColumns` (each `"t"` layer writes its key/value at the row's column and attends the columns
its key mask allows, with the fused-kernel-eligible call of `h1rl.models.attention.attend`; each `"m2"` layer runs
`MambaMixer.step` in place on its constant-size state, with causal-conv1d / mamba-ssm kernels on CUDA when
installed), then the LM head. Every module is called through its own `__call__`, in the same order as in a prefill
forward, so that DeepSpeed ZeRO-3's per-module parameter gathering sees the same sequence in every kind of call
(the rollout engine's synced decoding relies on it). The logits equal the model's own one-token decode path
(`tests/rollout/test_decode_step.py`, 1e-5 in float32).

CUDA graphs (`use_cuda_graphs=True`, model on CUDA): one graph per (batch bucket, key bucket): batch buckets are the
powers of two below `batch_size`, plus `batch_size`; key buckets the powers of two from 256 below `max_len`, plus
`max_len`, so that early steps of a long rollout do not read the whole KV buffer. A graph is captured on first use,
over views of the first rows and columns of the same buffers, after a few warm-up steps on a side stream (as torch's
CUDA graph notes require; the Mamba state they advance is restored before capture). A step of n rows reading k
columns replays the smallest buckets that hold them: rows n..bucket-1 are padding rows whose outputs are ignored and
whose state is stale (the engine never reads it again). All graphs share one memory pool and write their logits to
one buffer, valid until the next step.

Not supported under graphs (`graphs_unsupported_reason(model)` says why): RoPE types whose frequencies depend on the
longest position seen (`dynamic`, computed on the host), parameters partitioned by ZeRO-3 (fetched by hooks per
forward), a model dispatched over several devices. Graphs hold the parameters' addresses, so a decoder (and its
graphs) lives for one rollout phase: `RolloutEngine.generate` builds a new one per call.

    dec = StaticDecoder(model, batch_size=8, max_len=Tp + new_tokens, use_cuda_graphs=True)
    dec.cache.copy_rows_(...)                             # any way of filling rows 0..7 of the state
    logits = dec.step(tokens, positions, columns, num_keys=int(columns.max()) + 1)  # (n, V), n = tokens.numel()
"""

from __future__ import annotations

import time

import torch

from h1rl.models.batch import decode_columns
from h1rl.models.cache import HybridCache, MambaState
from h1rl.models.modeling import HybridForCausalLM

WARMUP_STEPS = 3  # eager steps on a side stream before a capture (cuBLAS handles, Triton JIT, allocator)
MIN_KEY_BUCKET = 256


def batch_buckets(max_rows: int, start: int = 1) -> list[int]:
    """Powers of two from `start` below `max_rows`, then `max_rows`: the sizes a graph is captured for."""
    buckets, b = [], start
    while b < max_rows:
        buckets.append(b)
        b *= 2
    return buckets + [max_rows]


def graphs_unsupported_reason(model: HybridForCausalLM) -> str | None:
    """Why `model`'s decode step cannot be captured as a CUDA graph, or None if it can."""
    if model.device.type != "cuda":
        return f"the model is on {model.device}, CUDA graphs need it on a CUDA device"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if "dynamic" in str(rope_type):
        return f"RoPE type {rope_type!r} recomputes its frequencies on the host from the longest position seen"
    if params_partitioned(model):
        return "its parameters are partitioned by DeepSpeed ZeRO-3 (gather them for generation)"
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "it is dispatched over several devices (hf_device_map)"
    return None


def params_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds some of `model`'s parameters partitioned right now."""
    return any(getattr(p, "ds_id", None) is not None and p.numel() == 0 for p in model.parameters())


def zero3_managed(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 manages `model`'s parameters (gathered or not at this moment: with its hooks active
    it may release and fetch them again at any module call)."""
    return any(getattr(p, "ds_id", None) is not None for p in model.parameters())


class StaticDecoder:
    """One-token decoding with static shapes over buffers it owns; CUDA graphs per bucket (see the module docstring).

    `batch_size`: rows of the buffers (the most rows a step may have); `max_len`: KV columns (prompt + new tokens);
    `dtype`: of the cache (default: the model's).
    """

    def __init__(
        self,
        model: HybridForCausalLM,
        batch_size: int,
        max_len: int,
        use_cuda_graphs: bool = False,
        dtype: torch.dtype | None = None,
    ):
        if use_cuda_graphs and (reason := graphs_unsupported_reason(model)) is not None:
            raise ValueError(f"StaticDecoder: cannot use CUDA graphs: {reason}; pass use_cuda_graphs=False")
        self.model, self.base = model, model.model
        self.batch_size, self.max_len, self.use_cuda_graphs = batch_size, max_len, use_cuda_graphs
        device = model.device
        self.cache = model.allocate_cache(batch_size, max_len, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.columns = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.buckets = batch_buckets(batch_size)
        self.key_buckets = batch_buckets(max_len, start=min(MIN_KEY_BUCKET, max_len))
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (rows, keys) bucket -> graph
        self._logits: torch.Tensor | None = None  # (B, V): what every graph writes
        self._views: dict[int, HybridCache] = {}  # rows -> the cache's first rows (views: made once per size)
        self._pool = None
        self.capture_s = 0.0  # seconds spent warming up and capturing graphs so far

    def bucket(self, n: int) -> int:
        """The smallest batch bucket that holds n rows."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"StaticDecoder: a step needs 1..{self.batch_size} rows, got {n}")
        return next(b for b in self.buckets if b >= n)

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor, num_keys: int | None = None
    ) -> torch.Tensor:
        """Decode one token for rows 0..n-1 (n = tokens.numel()): tokens, positions, columns (n,) long; the step
        reads the first `num_keys` KV columns (default: all; at least every row's column + 1: the caller knows it on
        the host). Returns logits (n, V), valid until the next step."""
        num_keys = self.max_len if num_keys is None else num_keys
        if not 1 <= num_keys <= self.max_len:
            raise ValueError(f"StaticDecoder: num_keys {num_keys} is outside the KV buffer [1, {self.max_len}]")
        n = tokens.shape[0]
        b = self.bucket(n)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.columns[:n].copy_(columns)
        if not self.use_cuda_graphs:
            return self.forward(n, num_keys)
        k = next(kb for kb in self.key_buckets if kb >= num_keys)
        if (b, k) not in self._graphs:
            self._capture(b, k)
        self._graphs[b, k].replay()
        return self._logits[:n]

    def forward(self, n: int, num_keys: int) -> torch.Tensor:
        """The step over the first n rows and `num_keys` columns of the buffers, run eagerly: logits (n, V). This is
        what a graph records."""
        decode = decode_columns(self.columns[:n], num_keys, self.model.config.sliding_window,
                                self.key_valid[:n, :num_keys])
        if n not in self._views:
            self._views[n] = self.cache.narrow(n)
        hidden = self.base(
            input_ids=self.tokens[:n, None], position_ids=self.positions[:n, None], cache=self._views[n],
            use_cache=True, decode=decode,
        ).last_hidden_state  # (n, 1, D)
        return self.model.lm_head(hidden[:, 0])  # (n, V)

    def _capture(self, b: int, k: int) -> None:
        start = time.perf_counter()
        device = self.tokens.device
        # warm-up steps run for real and advance the Mamba state in place: save rows 0..b-1 and restore them after.
        # KV writes need no restoring: a replay rewrites each row's column before any query reads it.
        mamba = [t[:b] for s in self.cache.layers if isinstance(s, MambaState) for t in s.tensors()]
        saved = [t.clone() for t in mamba]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.forward(b, k)
        torch.cuda.current_stream(device).wait_stream(side)
        for t, s in zip(mamba, saved):
            t.copy_(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._logits is None:
            self._logits = torch.empty(self.batch_size, self.model.config.vocab_size, device=device,
                                       dtype=self.model.lm_head.weight.dtype)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[:b].copy_(self.forward(b, k))
        self._graphs[b, k] = graph
        torch.cuda.synchronize(device)
        self.capture_s += time.perf_counter() - start
