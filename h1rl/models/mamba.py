"""The `"m2"` mixer: Apriel-H1's Mamba-in-Llama selective SSM, with a parallel path, a decode step and padding.

Semantics follow the Apriel-H1 reference (its Hugging Face export and Fast-LLM agree), weight names included:

    in_proj:  hidden -> [z (d_inner) | x (d_xb) | B (d_xb) | C (d_inner)]
    dt       = dt_proj(dt_in_proj(hidden))             # dt_proj's Linear adds its bias ...
    dt       = softplus(dt + dt_proj.bias)              # ... and the scan adds it again (as `delta_bias`)
    x, B     : groups of d_state channels, each repeated d_inner/d_xb times (like GQA's repeat_kv), before the conv
    x        = silu(causal depthwise conv1d(x) + conv bias), over d_inner channels
    heads    : H = d_inner / d_state heads of P = d_state channels; head h uses B[h] and C[h]
    A        = -exp(A_log) per channel and state (H*P, N), S4D-real init A = 1..N
    y        = scan(x, dt, A, B, C) + D * x;  out = out_proj(y * silu(z))

Left padding: pad tokens are zeroed before the convolution and get dt = 0 (decay 1, no input), so the conv and SSM
state reaching the first real token is exactly the zero state the row would have alone.

Paths: `forward` runs any number of tokens (training, prefill, continuation from a cached state) with the selective
scan of `h1rl.models.scan`; `step` decodes one token from the cached state. A cached state is updated in place,
except under autograd, where it is replaced (see `h1rl.models.cache`). causal-conv1d's kernels are used on CUDA
when installed (guarded imports); the pure-torch path runs everywhere and is what the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from h1rl.models.cache import MambaState, records_grad
from h1rl.models.configuration import HybridConfig
from h1rl.models.scan import selective_scan, selective_state_update

try:  # optional CUDA kernels (pip install h1rl[cuda])
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except ImportError:  # pragma: no cover - depends on the machine
    causal_conv1d_fn = causal_conv1d_update = None


def repeat_groups(t: torch.Tensor, group_size: int, repeats: int) -> torch.Tensor:
    """(..., G * group_size) -> (..., G * repeats * group_size): each group of channels repeated in place."""
    if repeats == 1:
        return t
    *lead, C = t.shape
    t = t.view(*lead, C // group_size, 1, group_size).expand(*lead, C // group_size, repeats, group_size)
    return t.reshape(*lead, C * repeats)


class MambaMixer(nn.Module):
    """The Mamba-in-Llama mixer of one `"m2"` layer (see the module docstring for the exact computation)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        cfg = config.ssm
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.d_inner, self.d_xb, self.d_state, self.d_conv = cfg.d_inner, cfg.d_xb, cfg.d_state, cfg.d_conv
        self.dt_rank = cfg.dt_rank
        self.num_heads = self.d_inner // self.d_state  # H; P = d_state channels per head
        self.repeat = self.d_inner // self.d_xb  # x/B groups -> heads
        self.ssm_cfg = cfg
        self.scan_impl = "auto"  # see h1rl.models.scan.selective_scan; tests and benchmarks pin other paths
        D, Di, Dxb = self.hidden_size, self.d_inner, self.d_xb
        self.in_proj = nn.Linear(D, 2 * Di + 2 * Dxb, bias=cfg.bias)
        self.dt_in_proj = nn.Linear(D, self.dt_rank, bias=cfg.bias)
        self.dt_proj = nn.Linear(self.dt_rank, Di, bias=cfg.dt_proj_bias)
        self.conv1d = nn.Conv1d(Di, Di, kernel_size=self.d_conv, groups=Di, padding=self.d_conv - 1, bias=cfg.conv_bias)
        self.A_log = nn.Parameter(torch.empty(Di, self.d_state))
        self.D = nn.Parameter(torch.empty(Di))
        self.out_proj = nn.Linear(Di, D, bias=cfg.bias)
        # Built inside DeepSpeed's zero.Init (ZeRO-3 from_pretrained), the submodules' parameters are already
        # partitioned (empty here): transformers then runs `_init_weights` with them gathered, module by module.
        if not hasattr(self.dt_proj.weight, "ds_id"):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Mamba's initialisation of A, D, dt and the convolution (tensors already loaded are left alone)."""
        cfg = self.ssm_cfg
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        dt_init_std = self.dt_rank**-0.5 * cfg.dt_scale
        if cfg.dt_init == "constant":
            init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        if self.dt_proj.bias is not None:
            log_dt = torch.rand(self.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
            dt = torch.exp(log_dt).clamp(min=cfg.dt_init_floor)
            init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            init.zeros_(self.conv1d.bias)

    # ---- shared pieces ---------------------------------------------------------------------------------------

    def _project(self, hidden_states: torch.Tensor):
        """(..., D) -> z (..., Di), x (..., Di) repeated, B (..., H, N) repeated, C (..., H, N), dt (..., Di) raw."""
        Di, Dxb, N = self.d_inner, self.d_xb, self.d_state
        z, x, B, C = self.in_proj(hidden_states).split([Di, Dxb, Dxb, Di], dim=-1)
        x = repeat_groups(x, N, self.repeat)  # (..., Di)
        B = repeat_groups(B, N, self.repeat).unflatten(-1, (self.num_heads, N))  # (..., H, N)
        C = C.unflatten(-1, (self.num_heads, N))  # (..., H, N)
        dt = self.dt_proj(self.dt_in_proj(hidden_states))  # (..., Di), dt_proj bias included once
        return z, x, B, C, dt

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        """Raw dt -> step size: the reference adds dt_proj's bias a second time before the softplus."""
        dt = dt.float()
        if self.dt_proj.bias is not None:
            dt = dt + self.dt_proj.bias.float()
        return F.softplus(dt)

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float()).view(self.num_heads, self.d_state, self.d_state)  # (H, P, N)

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, x, z: (..., Di) -> (..., D): skip connection, SiLU gate, output projection."""
        y = y + x * self.D.to(x.dtype)
        return self.out_proj(y * F.silu(z))

    # ---- parallel path ----------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, D)
        position_embeddings=None,  # unused; part of the mixer contract
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token; its last T columns are these tokens
        state: MambaState | None = None,  # continued from, and updated in place, when given
    ) -> torch.Tensor:
        Bsz, T, _ = hidden_states.shape
        z, x, Bm, Cm, dt = self._project(hidden_states)  # x: (B, T, Di)
        dt = self._dt(dt)  # (B, T, Di) float32
        if attention_mask is not None:
            valid = attention_mask[:, -T:].to(x.dtype)[..., None]  # (B, T, 1)
            x = x * valid
            dt = dt * valid.float()
        x = self._conv(x, state)  # (B, T, Di)
        H, P = self.num_heads, self.d_state
        y, final_state = selective_scan(
            x.view(Bsz, T, H, P),
            dt.view(Bsz, T, H, P),
            self._A(),
            Bm,
            Cm,
            initial_state=None if state is None else state.ssm,
            return_final_state=True,
            impl=self.scan_impl,
        )  # (B, T, H, P), (B, H, P, N)
        if state is not None:
            if records_grad(final_state):  # training through a cached prefix: keep the saved initial state intact
                state.ssm = final_state
            else:
                state.ssm.copy_(final_state)
        return self._output(y.reshape(Bsz, T, -1), x, z)

    def _conv(self, x: torch.Tensor, state: MambaState | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over time; x (B, T, Di). Continues from, and updates, `state.conv`."""
        K = self.d_conv
        weight = self.conv1d.weight[:, 0]  # (Di, K)
        xt = x.transpose(1, 2)  # (B, Di, T)
        if state is None and causal_conv1d_fn is not None and x.is_cuda:
            return causal_conv1d_fn(xt.contiguous(), weight, self.conv1d.bias, activation="silu").transpose(1, 2)
        if state is None:
            prefix = xt.new_zeros(xt.shape[0], xt.shape[1], K - 1)
        else:
            prefix = state.conv[..., 1:].to(xt.dtype)  # (B, Di, K-1): the last K-1 inputs seen
        full = torch.cat([prefix, xt], dim=-1)  # (B, Di, K-1+T)
        if state is not None and records_grad(full):
            state.conv = full[..., -K:]
        elif state is not None:
            state.conv.copy_(full[..., -K:])
        out = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)  # (B, Di, T)
        return F.silu(out).transpose(1, 2)

    # ---- one-token decode ---------------------------------------------------------------------------------------

    def step(
        self,
        hidden_states: torch.Tensor,  # (B, D) one new token per row
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,  # unused: decode tokens are real tokens
        state: MambaState | None = None,
    ) -> torch.Tensor:
        if state is None:
            raise ValueError(f"layer {self.layer_idx}: step() needs a state (see allocate_inference_cache)")
        Bsz = hidden_states.shape[0]
        z, x, Bm, Cm, dt = self._project(hidden_states)  # x: (B, Di); B, C: (B, H, N)
        weight = self.conv1d.weight[:, 0]  # (Di, K)
        if causal_conv1d_update is not None and x.is_cuda:
            x = causal_conv1d_update(x, state.conv, weight, self.conv1d.bias, "silu")
        else:
            conv = state.conv
            conv.copy_(torch.roll(conv, shifts=-1, dims=-1))
            conv[:, :, -1] = x
            x = (conv * weight).sum(-1)  # (B, Di)
            if self.conv1d.bias is not None:
                x = x + self.conv1d.bias
            x = F.silu(x)
        H, P = self.num_heads, self.d_state
        y = selective_state_update(
            state.ssm, x.view(Bsz, H, P), self._dt(dt).view(Bsz, H, P), self._A(), Bm, Cm
        )  # (B, H, P)
        return self._output(y.reshape(Bsz, -1).to(x.dtype), x, z)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> MambaState:
        """Zero state for `batch_size` rows; `max_seqlen` is unused: the state does not grow."""
        weight = self.in_proj.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        conv = torch.zeros(batch_size, self.d_inner, self.d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(batch_size, self.num_heads, self.d_state, self.d_state, dtype=torch.float32, device=device)
        return MambaState(conv, ssm)
