"""The decode cache of a hybrid model: constant-size state for Mamba layers, a KV buffer for attention layers.

`HybridCache` holds one entry per decoder layer:

- `MambaState` for `"m2"` layers: the last `d_conv` inputs of the causal convolution and the SSM state. Both have
  a size independent of the sequence length, which is where a hybrid's decoding memory and speed come from.
- `KVState` for `"t"` layers: preallocated key/value buffers plus a fill length. Appends write in place; a buffer
  that is too small doubles (so `generate` works without knowing the final length, and the rollout engine, which
  allocates the right size up front, never reallocates).
- `None` for identity layers.

Inference (no autograd) updates the buffers in place, which is what the rollout engine's static memory and CUDA
graphs rely on. When autograd records through a cache (the GRPO trainer's training forward over a shared prompt
prefix, `HybridModel.sharing_prefix`), updates replace the tensors instead (`records_grad`), so gradients flow back
through the cached prefix to the prompt's tokens.

The cache is not a `transformers.Cache`: its layer types are h1rl's own, so generation uses it through the model's
`_supports_default_dynamic_cache() -> False` hook (the route transformers keeps for Mamba-like models), and only the
few methods `generate` calls are provided (`get_seq_length`, `reorder_cache`, `is_compileable`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd is recording through any of `tensors`: cache updates must then be out of place."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass
class MambaState:
    conv: torch.Tensor  # (B, D, K) the last K convolution inputs, oldest first; D = d_inner, K = d_conv
    ssm: torch.Tensor  # (B, H, P, N) float32

    def index_select(self, rows: torch.Tensor) -> MambaState:
        return MambaState(self.conv.index_select(0, rows), self.ssm.index_select(0, rows))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.conv, self.ssm

    def narrow(self, n: int) -> MambaState:
        """A view of the first n rows (writes go to this state's buffers)."""
        return MambaState(self.conv[:n], self.ssm[:n])

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


@dataclass
class KVState:
    key: torch.Tensor  # (B, Hkv, S, P) buffer; positions [0, length) are filled
    value: torch.Tensor  # (B, Hkv, S, P)
    length: int = 0

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `key`/`value` (B, Hkv, T, P) after the filled part; return views of everything filled so far.

        Under autograd (a training forward through a cached prefix) the buffers are replaced rather than written in
        place, so that the keys and values the attention saved for its backward stay intact."""
        new_length = self.length + key.shape[2]
        if records_grad(key, self.key):
            self.key = torch.cat([self.key[:, :, : self.length], key], dim=2)
            self.value = torch.cat([self.value[:, :, : self.length], value], dim=2)
            self.length = new_length
            return self.key, self.value
        if new_length > self.key.shape[2]:
            self._grow(new_length)
        self.key[:, :, self.length : new_length] = key
        self.value[:, :, self.length : new_length] = value
        self.length = new_length
        return self.key[:, :, :new_length], self.value[:, :, :new_length]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.key.shape[2])
        for name in ("key", "value"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def index_select(self, rows: torch.Tensor) -> KVState:
        return KVState(self.key.index_select(0, rows), self.value.index_select(0, rows), self.length)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.key, self.value

    def narrow(self, n: int) -> KVState:
        """A view of the first n rows (writes go to this state's buffers; the fill length is copied)."""
        return KVState(self.key[:n], self.value[:n], self.length)

    def nbytes(self) -> int:
        """Bytes actually used by the filled positions (not the spare capacity)."""
        return 2 * self.key[:, :, : self.length].numel() * self.key.element_size()


LayerState = MambaState | KVState | None


class HybridCache:
    """Per-layer decode state of a `HybridForCausalLM`; build it with `HybridForCausalLM.allocate_cache`."""

    is_compileable = False

    def __init__(self, layers: list[LayerState], seen_tokens: int = 0):
        self.layers = layers
        self.seen_tokens = seen_tokens  # tokens consumed so far (prompt padding included)

    def __getitem__(self, layer_idx: int) -> LayerState:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        for state in self.layers:
            if isinstance(state, MambaState):
                return state.conv.shape[0]
            if isinstance(state, KVState):
                return state.key.shape[0]
        raise ValueError("the cache holds no state (identity layers only)")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def set_length(self, length: int) -> None:
        """Record that every row's first `length` tokens are in the cache (KV columns filled, tokens consumed); the
        decode step, which writes each row at its own column, does not count them itself."""
        for state in self.layers:
            if isinstance(state, KVState):
                state.length = length
        self.seen_tokens = length

    def ensure_capacity(self, length: int) -> None:
        """Grow the attention buffers (at least doubling) so that they hold `length` columns."""
        for state in self.layers:
            if isinstance(state, KVState) and state.key.shape[2] < length:
                state._grow(length)

    def index_select(self, rows: torch.Tensor) -> HybridCache:
        """A new cache whose row i is row `rows[i]` of this one (fan-out of a shared prefix, or compaction)."""
        layers = [None if s is None else s.index_select(rows) for s in self.layers]
        return HybridCache(layers, self.seen_tokens)

    def narrow(self, n: int) -> HybridCache:
        """A cache over the first n rows whose tensors are views of this cache's buffers (no allocation)."""
        return HybridCache([None if s is None else s.narrow(n) for s in self.layers], self.seen_tokens)

    def compact_(self, keep: torch.Tensor) -> HybridCache:
        """Move rows `keep` (ascending) to the front of the buffers in place; return the view of those rows.

        This is how the rollout engine drops finished rows without reallocating its decode cache.
        """
        n = keep.numel()
        for state in self.layers:
            if state is not None:
                for t in state.tensors():
                    t[:n] = t.index_select(0, keep)
        return self.narrow(n)

    def copy_rows_(self, rows: torch.Tensor, source: HybridCache, source_rows: torch.Tensor, columns: int) -> None:
        """Row rows[i] of this cache becomes row source_rows[i] of `source`: its Mamba state and the first `columns`
        KV columns (in place; the rollout engine's slots take the state of freshly prefilled prompts)."""
        for mine, theirs in zip(self.layers, source.layers):
            if isinstance(mine, KVState):
                for t_mine, t_theirs in zip(mine.tensors(), theirs.tensors()):
                    t_mine[:, :, :columns].index_copy_(0, rows, t_theirs[:, :, :columns].index_select(0, source_rows))
            elif mine is not None:
                for t_mine, t_theirs in zip(mine.tensors(), theirs.tensors()):
                    t_mine.index_copy_(0, rows, t_theirs.index_select(0, source_rows))

    def fill_repeated_(self, source: HybridCache, repeats: int) -> None:
        """Row r * repeats + g of this cache becomes row r of `source`, for g < repeats (prefix fan-out).

        `source`'s KV buffers may be shorter than this cache's; the filled part is copied.
        """
        for mine, theirs in zip(self.layers, source.layers):
            if mine is None:
                continue
            if isinstance(mine, KVState):
                L = theirs.length
                mine.key[:, :, :L] = theirs.key[:, :, :L].repeat_interleave(repeats, dim=0)
                mine.value[:, :, :L] = theirs.value[:, :, :L].repeat_interleave(repeats, dim=0)
                mine.length = L
            else:
                for t_mine, t_theirs in zip(mine.tensors(), theirs.tensors()):
                    t_mine.copy_(t_theirs.repeat_interleave(repeats, dim=0))
        self.seen_tokens = source.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """In-place row selection, as beam search in `generate` asks for."""
        self.layers = self.index_select(beam_idx).layers

    def nbytes_per_sequence(self) -> int:
        """Decode-state bytes one sequence holds now (KV counted up to the filled length)."""
        return sum(s.nbytes() for s in self.layers if s is not None) // max(self.batch_size, 1)
