"""`h1rl bench scan`: forward+backward time of one mixer layer, side by side in one run.

Three layers of the same width (hidden D), at batch B and each sequence length T:
- h1rl's `"m2"` mixer (its fast scan, `impl="auto"`, and the pure-torch fast path `impl="torch"`);
- transformers' `MambaMixer` (Mamba-1) on its pure-torch fallback, at matching dimensions (d_inner D, d_state 16,
  dt_rank D/16, conv 4): what a user without CUDA kernels gets from transformers;
- an attention layer of the same width (h1rl's SDPA attention, head_dim 32, 4:1 grouped-query).
The m2 layer has Apriel-H1's proportions: expand 1 (d_inner = D), d_xb = D/4 (the teacher's 4:1 KV grouping).
Mixer layers only (no MLP, no norms): the MLP is identical in both model kinds. The machine is shared and noisy, so
figures are ratios of medians measured in the same process. Run: `h1rl bench scan [--seq-lens 512 2048]`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

from h1rl.models.attention import Attention
from h1rl.models.configuration import HybridConfig
from h1rl.models.mamba import MambaMixer


def _time_fwd_bwd(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int, warmup: bool = True
) -> float:
    """Median seconds of forward + backward of `fn` on a fresh leaf copy of x (after one warm-up run)."""
    times = []
    for i in range(repeats + int(warmup)):
        inp = x.detach().clone().requires_grad_(True)
        start = time.perf_counter()
        fn(inp).float().square().mean().backward()
        if i >= int(warmup):
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_layers(hidden: int) -> dict[str, torch.nn.Module]:
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

    heads = hidden // 32
    cfg = HybridConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1), vocab_size=128, hybrid_block_layout=["t", "m2"],
        ssm_cfg={"d_inner": hidden, "d_xb": hidden // 4, "d_state": 16, "dt_rank": hidden // 16},
    )
    hf_cfg = MambaConfig(hidden_size=hidden, intermediate_size=hidden, state_size=16, time_step_rank=hidden // 16,
                         conv_kernel=4, num_hidden_layers=1, vocab_size=128)
    return {"attention": Attention(cfg, 0), "h1rl_m2": MambaMixer(cfg, 1), "hf_mamba": HFMambaMixer(hf_cfg, 0)}


def run_scan_benchmark(
    seq_lens: list[int] = (512, 2048), batch: int = 4, hidden: int = 256, repeats: int = 3,
    json_path: str | None = None, hf_max_repeats_long: int = 1,
) -> list[dict]:
    torch.manual_seed(0)
    layers = build_layers(hidden)
    attention, m2, hf = layers["attention"], layers["h1rl_m2"], layers["hf_mamba"]
    rows = []
    print(f"forward+backward of one mixer layer, hidden {hidden}, batch {batch}, torch threads "
          f"{torch.get_num_threads()} (median of {repeats}, seconds)")
    header = f"{'T':>6} {'attention':>10} {'h1rl m2':>10} {'m2 torch':>10} {'hf mamba':>10} {'hf/m2':>8} {'m2/attn':>8}"
    print(header)
    for T in seq_lens:
        x = torch.randn(batch, T, hidden)
        pos = torch.arange(T)[None].expand(batch, -1)
        cos_sin = attention_rope(attention, x, pos)
        t_attn = _time_fwd_bwd(lambda h, cs=cos_sin: attention(h, cs), x, repeats)
        t_m2 = _time_fwd_bwd(lambda h: m2(h), x, repeats)
        t_m2_torch = _time_fwd_bwd(lambda h: _with_impl(m2, h, "torch"), x, repeats)
        # tens of seconds a call: no warm-up, and fewer repeats at long T
        hf_repeats = repeats if T <= 512 else min(repeats, hf_max_repeats_long)
        t_hf = _time_fwd_bwd(lambda h: hf(h), x, hf_repeats, warmup=False)
        row = dict(T=T, batch=batch, hidden=hidden, attention_s=t_attn, h1rl_m2_s=t_m2, h1rl_m2_torch_s=t_m2_torch,
                   hf_mamba_s=t_hf, hf_over_m2=t_hf / t_m2, m2_over_attention=t_m2 / t_attn)
        rows.append(row)
        print(f"{T:>6} {t_attn:>10.3f} {t_m2:>10.3f} {t_m2_torch:>10.3f} {t_hf:>10.3f} "
              f"{t_hf / t_m2:>7.1f}x {t_m2 / t_attn:>7.2f}x")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def attention_rope(attention: Attention, x: torch.Tensor, pos: torch.Tensor):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = HybridConfig(hidden_size=x.shape[-1], num_attention_heads=attention.num_heads, num_hidden_layers=1,
                       num_key_value_heads=attention.num_kv_heads, vocab_size=8, intermediate_size=8)
    return LlamaRotaryEmbedding(cfg)(x, pos)


def _with_impl(mixer: MambaMixer, h: torch.Tensor, impl: str) -> torch.Tensor:
    previous, mixer.scan_impl = mixer.scan_impl, impl
    try:
        return mixer(h)
    finally:
        mixer.scan_impl = previous
