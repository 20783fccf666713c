"""Static-shape decode step of a hybrid model, and its CUDA graphs per batch bucket (used by `RolloutEngine`).

The model's own one-token path (`HybridForCausalLM.forward` with a cache) is dynamic: attention appends to its KV
buffer and attends over the filled part (a Python-int length), and the forward checks its inputs on the host. That
cannot be captured as a CUDA graph. `StaticDecoder` runs the same computation with static shapes and no host
synchronisation, on buffers it owns:

- `cache`: a `HybridCache` of `batch_size` rows whose KV buffers hold `max_len` tokens (never reallocated);
- `key_mask` (batch_size, max_len) bool: which buffer columns hold real tokens. The caller maintains it (prompt
  padding False, everything from the first decode column on True); causality comes from the write column, so
  columns not written yet may already be True;
- `tokens`, `positions` (batch_size,) long and `write_index` (1,) long: the inputs of one step.

One step, for the first n rows: embed `tokens`, RoPE cos/sin from `positions`; each `"t"` layer writes its new
key/value at column `write_index` of the full buffer and attends over all `max_len` columns under `key_mask`
(`Attention.step_static`); each `"m2"` layer runs `MambaMixer.step` (in place on its constant-size state, with
causal-conv1d / mamba-ssm kernels on CUDA when installed); `"i"` layers are skipped. The logits equal the dynamic
path's (`tests/rollout/test_decode_step.py`, 1e-5 in float32).

CUDA graphs (`use_cuda_graphs=True`, model on CUDA): batch buckets are the powers of two below `batch_size`, plus
`batch_size`. A bucket's graph is captured on first use, over views of the first `bucket` rows of the same buffers,
after a few warm-up steps on a side stream (as torch's CUDA graph notes require; the Mamba state they advance is
restored before capture). A step of n rows replays the smallest bucket >= n: rows n..bucket-1 are padding rows
whose outputs are ignored and whose state is stale (the engine compacts active rows to the front, so it never
reads them again). All graphs share one memory pool; the logits a step returns live in that pool and are valid
until the next step.

Not supported under graphs (`graphs_unsupported_reason(model)` says why): RoPE types whose frequencies depend on the
longest position seen (`dynamic`, computed on the host), parameters partitioned by ZeRO-3 (fetched by hooks per
forward), a model dispatched over several devices. Graphs hold the parameters' addresses, so a decoder (and its
graphs) lives for one rollout phase: `RolloutEngine.generate` builds a new one per call.

    dec = StaticDecoder(model, batch_size=8, max_len=Tp + new_tokens, use_cuda_graphs=True)
    dec.cache.fill_repeated_(prefill_cache, 4)          # any way of filling rows 0..7 of the state
    dec.key_mask[:, :Tp] = prompt_mask.repeat_interleave(4, 0); dec.key_mask[:, Tp:] = True
    logits = dec.step(tokens, positions, write_index=Tp)  # (n, V) for the first n = tokens.numel() rows
"""

from __future__ import annotations

import time

import torch

from h1rl.models.cache import HybridCache, KVState, MambaState
from h1rl.models.modeling import HybridForCausalLM

WARMUP_STEPS = 3  # eager steps on a side stream before a capture (cuBLAS handles, Triton JIT, allocator)


def batch_buckets(max_rows: int) -> list[int]:
    """Powers of two below `max_rows`, then `max_rows`: the batch sizes a graph is captured for."""
    buckets, b = [], 1
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
    if any(getattr(p, "ds_id", None) is not None and p.numel() == 0 for p in model.parameters()):
        return "its parameters are partitioned by DeepSpeed ZeRO-3 (gather them for generation)"
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "it is dispatched over several devices (hf_device_map)"
    return None


def set_filled_length(cache: HybridCache, length: int) -> None:
    """Record that `length` columns of every KV buffer are filled (the static step writes but does not count)."""
    for state in cache.layers:
        if isinstance(state, KVState):
            state.length = length
    cache.seen_tokens = length


class StaticDecoder:
    """One-token decoding with static shapes over buffers it owns; CUDA graphs per batch bucket (module docstring).

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
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)
        self.buckets = batch_buckets(batch_size)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self._pool = None
        self.capture_s = 0.0  # seconds spent warming up and capturing graphs so far

    def bucket(self, n: int) -> int:
        """The smallest bucket that holds n rows."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"StaticDecoder: a step needs 1..{self.batch_size} rows, got {n}")
        return next(b for b in self.buckets if b >= n)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, write_index: int) -> torch.Tensor:
        """Decode one token for rows 0..n-1 (n = tokens.numel()): tokens, positions (n,) long; the new keys go to
        buffer column `write_index`. Returns logits (n, V), valid until the next step."""
        if not 0 <= write_index < self.max_len:
            raise ValueError(f"StaticDecoder: write_index {write_index} is outside the KV buffer [0, {self.max_len})")
        n = tokens.shape[0]
        b = self.bucket(n)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.write_index.fill_(write_index)
        if not self.use_cuda_graphs:
            return self.forward(n)
        if b not in self._graphs:
            self._capture(b)
        graph, logits = self._graphs[b]
        graph.replay()
        return logits[:n]

    def forward(self, n: int) -> torch.Tensor:
        """The static step over the first n rows of the buffers, run eagerly: logits (n, V). This is what a graph
        records."""
        cache = self.cache.narrow(n)
        key_mask, write_index = self.key_mask[:n], self.write_index  # (n, S), (1,)
        h = self.base.embed_tokens(self.tokens[:n])  # (n, D)
        cos_sin = self.base.rotary_emb(h, self.positions[:n, None])  # cos, sin: (n, 1, P)
        for layer in self.base.layers:
            if layer.code == "i":
                continue
            state = cache[layer.layer_idx]
            x = layer.input_layernorm(h)
            if layer.code == "t":
                x = layer.self_attn.step_static(x, cos_sin, key_mask, state, write_index)
            else:
                x = layer.mixer.step(x, None, None, state)
            h = h + x
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(self.base.norm(h))  # (n, V)

    def _capture(self, b: int) -> None:
        start = time.perf_counter()
        device = self.tokens.device
        # warm-up steps run for real and advance the Mamba state in place: save rows 0..b-1 and restore them after.
        # KV writes need no restoring: a replay rewrites column write_index before any query reads it.
        mamba = [t[:b] for s in self.cache.layers if isinstance(s, MambaState) for t in s.tensors()]
        saved = [t.clone() for t in mamba]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.forward(b)
        torch.cuda.current_stream(device).wait_stream(side)
        for t, s in zip(mamba, saved):
            t.copy_(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(b)
        self._graphs[b] = (graph, logits)
        torch.cuda.synchronize(device)
        self.capture_s += time.perf_counter() - start
