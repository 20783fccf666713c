"""The rollout engine: G completions per prompt from a hybrid model, fast, with the log-probs the trainer needs.

Why not `model.generate`: GRPO samples G completions of each prompt, and a hybrid's decode state is small, so the
work that matters is (1) prefilling each distinct prompt once, (2) decoding with no per-step Python or allocation
overhead beyond the model itself, (3) not paying for rows that already finished, and (4) returning per-token
log-probs that equal the trainer's recomputation. `generate` does none of these for a stateful model.

How a rollout phase runs (`RolloutEngine.generate`):
1. The distinct prompts are left-padded into one batch and prefilled once with the parallel path (scan for Mamba
   layers, SDPA for attention layers) into a prefill cache sized to the prompts.
2. The decode cache for all B*G rows is allocated once, at its final size (prompt + max_new_tokens), and each
   prompt's state (constant-size Mamba state, KV for attention layers) is copied to its G rows.
3. Each step decodes one token for the active rows only: `step()` for Mamba layers (kernels on CUDA), one-query
   attention over the KV buffer. Rows that emit a stop token or reach the length cap finish; when enough have
   finished, the active rows are moved to the front of the same buffers (`HybridCache.compact_`) and decoding
   continues on the smaller batch. Nothing is reallocated per step.
   The step itself is chosen by `decode`: "eager" calls the model's forward (dynamic shapes); "static" runs
   `h1rl.rollout.decode_step.StaticDecoder` (static shapes over the whole KV buffer, same logits); "cuda_graph"
   replays that static step as a CUDA graph per batch bucket (captured on first use). "auto" is "eager" for now:
   the CUDA graph path has not yet run on a GPU (h1rl/bench/gpu_check.py is the prepared check); once a GPU run
   has validated it, "auto" becomes "cuda_graph" on CUDA.
4. Log-probs are `log_softmax(logits / temperature)` of each drawn token (see `h1rl.rollout.sampling`).

Rows are prompt-major: output row r * G + g is completion g of prompt r.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from h1rl.models.modeling import HybridForCausalLM
from h1rl.rollout.decode_step import StaticDecoder, graphs_unsupported_reason, set_filled_length
from h1rl.rollout.sampling import SamplingParams, sample_next

COMPACT_FRACTION = 0.125  # compact the active batch once this fraction of its rows has finished
DECODE_MODES = ("auto", "eager", "static", "cuda_graph")  # see the module docstring


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


class RolloutEngine:
    """Fast batched sampling from an `HybridForCausalLM` (see the module docstring).

    >>> engine = RolloutEngine(model, pad_token_id=0)
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

    def decode_mode(self) -> str:
        """The decode step `generate` uses for the model where it is now ("auto" resolved)."""
        reason = graphs_unsupported_reason(self.model)
        if self.decode == "auto":
            return "eager"  # "cuda_graph" on CUDA once the GPU check has validated it (see the module docstring)
        if self.decode == "cuda_graph" and reason is not None:
            raise ValueError(f"decode='cuda_graph' is not possible: {reason}; use decode='auto', 'eager' or 'static'")
        return self.decode

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
        mode = self.decode_mode()
        model, device = self.model, self.model.device
        B = len(prompts)
        counts = [num_generations] * B if isinstance(num_generations, int) else list(num_generations)
        if len(counts) != B or min(counts) < 1:
            raise ValueError(f"num_generations must be a positive int or one positive count per prompt, got {counts}")
        G = torch.tensor(counts, device=device)  # (B,) completions per prompt
        R = int(G.sum())
        stream = params.stream_rows if params.stream_rows is not None else R  # uniforms drawn per step
        if params.stream_offset + R > stream:
            raise ValueError(f"rows {params.stream_offset}..{params.stream_offset + R - 1} of this call do not fit in "
                             f"the sampling stream of {stream} rows (SamplingParams.stream_rows / stream_offset)")
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, (1,)).item()))

        # 1. prefill each distinct prompt once (left-padded batch)
        t0 = time.perf_counter()
        prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
        Tp = int(prompt_lens.max())
        ids = torch.full((B, Tp), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(B, Tp, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, Tp - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            mask[r, Tp - len(p) :] = 1
        padded = bool((mask == 0).any())
        prefill_cache = model.allocate_cache(B, Tp)
        logits = model(
            ids, attention_mask=mask if padded else None, cache=prefill_cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]  # (B, V)

        # 2. the decode cache, allocated once at full size, each prompt's state fanned out to its G rows
        Tmax = Tp + params.max_new_tokens
        decoder = None if mode == "eager" else StaticDecoder(model, R, Tmax, use_cuda_graphs=mode == "cuda_graph")
        cache = model.allocate_cache(R, Tmax) if decoder is None else decoder.cache
        cache.fill_repeated_(prefill_cache, G)
        del prefill_cache
        # key mask: prompt padding, then ones (the static decoder's own bool buffer, which its graphs read)
        full_mask = torch.ones(R, Tmax, dtype=torch.long, device=device) if decoder is None else decoder.key_mask
        full_mask[:, :Tp] = mask.repeat_interleave(G, dim=0)
        full_mask[:, Tp:] = 1
        history = torch.full((R, Tmax), self.pad_token_id, dtype=torch.long, device=device)  # for the penalty
        history[:, :Tp] = ids.repeat_interleave(G, dim=0)
        positions = prompt_lens.repeat_interleave(G)  # (R,) RoPE position of each row's next token
        logits = logits.repeat_interleave(G, dim=0)  # (R, V)
        prefill_s = time.perf_counter() - t0

        # 3. decode: rows[i] is the output row held in slot i of the (compacted) active batch
        t0 = time.perf_counter()
        completion = torch.full((R, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(R, params.max_new_tokens, dtype=torch.float32, device=device)
        lengths = torch.zeros(R, dtype=torch.long, device=device)
        stopped = torch.zeros(R, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        rows = torch.arange(R, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)  # per slot of the active batch
        view = cache.narrow(R)
        for t in range(params.max_new_tokens):
            n = rows.numel()
            hist = history[:n, : Tp + t] if params.repetition_penalty != 1.0 else None
            # one uniform per output row, indexed by its row in the stream: compaction- and sharding-proof
            uniforms = torch.rand(stream, generator=generator, device=device)[params.stream_offset + rows]
            tokens, lp = sample_next(logits, params, uniforms, hist)  # (n,), (n,)
            tokens = torch.where(done, self.pad_token_id, tokens)
            completion[rows, t] = tokens
            logprobs[rows, t] = torch.where(done, 0.0, lp)
            lengths[rows] += (~done).long()
            hit_stop = torch.isin(tokens, stop_ids) & ~done if stop_ids.numel() else torch.zeros_like(done)
            stopped[rows] |= hit_stop
            done = done | hit_stop
            if t + 1 == params.max_new_tokens or bool(done.all()):
                break
            history[:n, Tp + t] = tokens
            if int(done.sum()) >= max(1, int(self.compact_fraction * n)):
                keep = (~done).nonzero()[:, 0]  # ascending slots
                view = view.compact_(keep)
                for buf in (full_mask, history):
                    buf[: keep.numel()] = buf.index_select(0, keep)
                rows, tokens, positions, done = rows[keep], tokens[keep], positions[keep], done[keep]
            n = rows.numel()
            if decoder is None:
                step_mask = full_mask[:n, : Tp + t + 1] if padded else None
                ids_t, pos_t = tokens[:, None], positions[:, None]
                logits = model(ids_t, attention_mask=step_mask, position_ids=pos_t, cache=view, use_cache=True).logits
                logits = logits[:, -1]
            else:
                logits = decoder.step(tokens, positions, write_index=Tp + t)  # (n, V), valid until the next step
            positions = positions + 1
        decode_s = time.perf_counter() - t0
        if decoder is not None:
            set_filled_length(view, Tp + t)  # the static step does not count: tokens fed = decode steps run
        state_bytes_per_seq = view.nbytes_per_sequence()  # Mamba state + KV filled up to the last decoded token

        L = int(lengths.max())
        generated = int(lengths.sum())
        reasons = ["stop" if s else "length" for s in stopped.tolist()]
        return Rollout(
            prompt_ids=[list(p) for p, g in zip(prompts, counts) for _ in range(g)],
            completion_ids=completion[:, :L].cpu(),
            logprobs=logprobs[:, :L].cpu(),
            lengths=lengths.cpu(),
            finish_reasons=reasons,
            stats={
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "generated_tokens": float(generated),
                "tokens_per_s": generated / max(prefill_s + decode_s, 1e-9),
                "state_bytes_per_seq": float(state_bytes_per_seq),
                "graph_capture_s": decoder.capture_s if decoder is not None else 0.0,  # inside decode_s
            },
        )

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

