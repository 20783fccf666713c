"""`h1rl bench memory`: per-GPU memory of GRPO on a hybrid under DeepSpeed ZeRO, with the arithmetic printed.

Parameter counts come from the model itself (built on the meta device, so a 15B model costs nothing); the rest is
the standard mixed-precision accounting (ZeRO paper, section 3): bf16 weights (2 bytes per parameter) and
gradients (2), and Adam's fp32 master weights, momentum and variance (12). Per GPU, for N GPUs:

    ZeRO-2          2P + (2P + 12P) / N      weights replicated; gradients and optimizer state sharded
    ZeRO-3          (2P + 2P + 12P) / N      everything sharded; each layer's weights gathered when used
    ZeRO-3 offload  ~2 layers' weights      optimizer state and weights in host RAM: (12P + 2P) * 8 / N per 8-GPU node

plus what does not shard: activations (activation checkpointing keeps one (B, T, hidden) tensor per layer), the
log-prob computation's logits (B, T, vocab, fp32, TRL's chunking aside) and the rollout decode cache (attention:
K and V per token; m2 layers: a fixed conv and SSM state per sequence). The default is Apriel-H1's 15B shape.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 2**30


@dataclass
class Shape:
    """A hybrid's size: the 15B Apriel-Nemotron teacher's shape by default (../shared/DESIGN.md)."""

    hidden: int = 5120
    layers: int = 50
    m2_layers: int = 30  # Apriel-H1-15b-Thinker: 30 of 50 layers are m2 ("H-30")
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 131072
    d_state: int = 16
    d_inner: int = 4096
    d_xb: int = 1024
    d_conv: int = 4


def parameter_count(shape: Shape) -> int:
    """Parameters of the hybrid with `shape`, counted on the meta device from h1rl's own model."""
    import torch

    from h1rl.models import HybridConfig, HybridForCausalLM

    layout = ["m2"] * shape.m2_layers + ["t"] * (shape.layers - shape.m2_layers)
    config = HybridConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=False, hybrid_block_layout=layout,
        ssm_cfg={"d_state": shape.d_state, "d_inner": shape.d_inner, "d_xb": shape.d_xb, "d_conv": shape.d_conv},
    )
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def estimate(shape: Shape, gpus: int, micro_batch: int, seq_len: int, rollout_rows: int, reference_model: bool,
             activation_checkpointing: bool = True) -> list[tuple[str, str, float]]:
    """(what, arithmetic, GiB per GPU) rows."""
    P = parameter_count(shape)
    N, B, T = gpus, micro_batch, seq_len
    attn = shape.layers - shape.m2_layers
    rows = [
        ("parameters", f"P = {P / 1e9:.2f}B (counted)", 0.0),
        ("ZeRO-2: weights + grads/N + Adam/N", f"2P + (2P + 12P) / {N}", (2 * P + 14 * P / N) / GiB),
        ("ZeRO-3: all sharded", f"16P / {N}", 16 * P / N / GiB),
        ("ZeRO-3 offload: GPU (weights gathered per layer)", "2 layers' bf16 weights = 2 * (P / layers) * 2",
         2 * P / shape.layers * 2 / GiB),
        ("ZeRO-3 rollout phase: whole model gathered", "2P (TRL gathers once per rollout, not per token)",
         2 * P / GiB),
        ("ZeRO-3 offload: host RAM per 8-GPU node", f"(12P + 2P) * 8 / {N}", 14 * P * 8 / N / GiB),
    ]
    if reference_model:
        rows.append(("reference model (beta > 0), ZeRO-3", f"2P / {N}", 2 * P / N / GiB))
    layer = B * T * (4 * shape.hidden + 2 * shape.intermediate + 3 * shape.d_inner) * 2  # one layer's activations
    per_layer = "B*T*(4*hidden + 2*intermediate + 3*d_inner)*2"
    if activation_checkpointing:
        acts = B * T * shape.hidden * 2 * shape.layers
        rows.append(("activations, checkpointed",
                     f"B*T*hidden*2 bytes*layers = {B}*{T}*{shape.hidden}*2*{shape.layers}", acts / GiB))
        rows.append(("one layer's live activations in backward", per_layer, layer / GiB))
    else:
        rows.append(("activations, all layers", f"{per_layer}*layers", layer * shape.layers / GiB))
    logits = B * T * shape.vocab * 4
    rows.append(("logits for log-probs (fp32)", f"B*T*vocab*4 = {B}*{T}*{shape.vocab}*4", logits / GiB))
    kv = rollout_rows * T * attn * 2 * shape.kv_heads * shape.head_dim * 2
    ssm = rollout_rows * shape.m2_layers * (shape.d_inner * shape.d_conv * 2 + shape.d_inner * shape.d_state * 4)
    rows.append(("rollout cache: attention K,V (bf16)",
                 f"rows*T*{attn} layers*2*kv_heads*head_dim*2 = {rollout_rows}*{T}*{attn}*2*{shape.kv_heads}*"
                 f"{shape.head_dim}*2", kv / GiB))
    rows.append(("rollout cache: m2 states (conv bf16, SSM fp32)",
                 f"rows*{shape.m2_layers} layers*(d_inner*d_conv*2 + d_inner*d_state*4)", ssm / GiB))
    teacher_kv = rollout_rows * T * shape.layers * 2 * shape.kv_heads * shape.head_dim * 2
    rows.append(("  (the all-attention teacher's K,V, for comparison)", f"rows*T*{shape.layers}*2*kv_heads*head_dim*2",
                 teacher_kv / GiB))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="h1rl bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=16, help="data-parallel GPUs (N nodes x 8)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward/backward")
    parser.add_argument("--seq-len", type=int, default=8192, help="prompt + completion tokens")
    parser.add_argument("--rollout-rows", type=int, default=64, help="sequences decoded at once per GPU")
    parser.add_argument("--m2-layers", type=int, default=Shape.m2_layers)
    parser.add_argument("--reference-model", action="store_true", help="GRPO with beta > 0 keeps a reference model")
    args = parser.parse_args(argv)
    shape = Shape(m2_layers=args.m2_layers)
    rows = estimate(shape, args.gpus, args.micro_batch, args.seq_len, args.rollout_rows, args.reference_model)
    print("| what | arithmetic | GiB |\n|---|---|---|")
    for what, arithmetic, gib in rows:
        print(f"| {what} | {arithmetic} | {gib:.2f} |" if gib else f"| {what} | {arithmetic} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
