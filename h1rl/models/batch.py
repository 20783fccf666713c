"""How the rows of one forward are laid out: worked out once per forward, read by every mixer.

- `Padding`: which of the S = cached + new positions of each row are real tokens, and whether the rows are
  *right-padded* (real tokens, then pads). Right padding needs no attention mask at all: causality alone keeps every
  real token's query away from the pads after it, so attention can run on the flash kernel (`h1rl.models.attention`).
  `HybridModel.forward` builds it once per forward, with one host synchronisation, so that no layer re-inspects the
  mask.
- Left-padded rows without a cache (the GRPO training forward, a log-prob recomputation) are turned into
  right-padded ones: `left_align` moves each row's tokens to column 0, the layers run with no mask, and `restore`
  puts the outputs back in the caller's columns. A causal model gives every real token the same output either way
  (its RoPE positions come from the mask, not the column), so this is exact; it is what keeps a padded training
  batch on a fused attention kernel that takes no mask.
- `DecodeColumns`: one decode step over rows of different lengths (the rollout engine's slots, or `generate`'s
  left-padded rows): the KV buffer column each row writes its new key/value to, and the key columns each row reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Padding:
    mask: torch.Tensor  # (B, S) bool: real tokens among the S = cached + new positions
    right_padded: bool  # every row is real tokens, then pads: causal attention needs no mask


@dataclass(frozen=True)
class DecodeColumns:
    write: torch.Tensor  # (n,) long: the KV buffer column of each row's new token
    key_mask: torch.Tensor  # (n, S) bool: the buffer columns each row's query reads (causality, pads, window applied)


def decode_columns(
    write: torch.Tensor,  # (n,) long: column of each row's new token
    num_keys: int,  # S: buffer columns the step reads (at least write.max() + 1)
    sliding_window: int | None,
    valid: torch.Tensor | None = None,  # (n, S) bool: real tokens (prompt padding); None: every column up to `write`
) -> DecodeColumns:
    """The columns of one decode step: row i reads columns j <= write[i] (within the window) that are real."""
    j = torch.arange(num_keys, device=write.device)[None, :]  # (1, S)
    col = write[:, None]  # (n, 1)
    key_mask = j <= col
    if sliding_window is not None:
        key_mask = key_mask & (col - j < sliding_window)
    if valid is not None:
        key_mask = key_mask & valid
    return DecodeColumns(write, key_mask)


@dataclass(frozen=True)
class MaskLayout:
    """What one host read of a 2D attention mask tells: nothing padded, right-padded rows, or rows that are pads,
    tokens, pads (contiguous tokens), which a cacheless forward can left-align."""

    all_real: bool
    right_padded: bool
    contiguous: bool

    @classmethod
    def of(cls, mask: torch.Tensor) -> MaskLayout:  # mask (B, S), 1 on real tokens
        m = mask.bool()
        starts = (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0].long()  # (B,) runs of real tokens per row
        rises = (m[:, 1:] & ~m[:, :-1]).any()
        flags = torch.stack([m.all(), ~rises, (starts <= 1).all()])
        all_real, right_padded, contiguous = flags.tolist()  # the one host synchronisation
        return cls(all_real, right_padded, contiguous)


def leading_pads(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) mask -> (B,) long: pad positions before each row's first real token (S for an all-pad row)."""
    return (mask.long().cumsum(1) == 0).sum(1)


def left_align(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """t (B, T, ...) with row b moved left by shift[b] columns (the columns it skips wrap around to its end)."""
    B, T = t.shape[:2]
    index = (torch.arange(T, device=t.device)[None, :] + shift[:, None]) % T  # (B, T)
    return t.gather(1, index.view(B, T, *([1] * (t.dim() - 2))).expand_as(t))


def restore(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The inverse of `left_align`: t (B, T, ...) with row b moved right by shift[b] columns."""
    return left_align(t, (-shift) % t.shape[1])
