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

Padding: pad tokens are zeroed before the convolution and get dt = 0 (decay 1, no input). Leading pads therefore
leave the zero state untouched, so the first real token sees exactly the state the row would have alone; pads after
the real tokens (right padding: the rollout engine's prefill chunks) leave the SSM state as the last real token left
it, and the convolution state kept for the next call is taken at each row's last real token.

Paths: `forward` runs any number of tokens (training, prefill, continuation from a cached state) with the selective
scan of `h1rl.models.scan`; with `decode` (one token per row) it runs `step`. A cached state is updated in place,
except under autograd, where it is replaced (see `h1rl.models.cache`). A state that holds nothing yet
(`state_is_empty`: a fresh cache) is not passed to the scan as an initial state, so the fused CUDA scan can run;
a continuation passes it (the scan's CUDA path continues from a state too). causal-conv1d's kernels are used on
CUDA when installed (guarded imports); the pure-torch path runs everywhere and is what the tests compare against.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from h1rl.models.batch import DecodeColumns, Padding
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
        self.register_external_parameters()

    def register_external_parameters(self) -> None:
        """Tell DeepSpeed ZeRO-3 that this mixer reads dt_proj's bias and conv1d's weight and bias outside those
        modules' forward (it adds the bias a second time and runs the convolution itself), so that its hooks gather
        them with the mixer's own. DeepSpeed finds such parameters by itself only in forwards that go through its
        engine; a rollout with the weights left partitioned calls the model directly and would read empty tensors.
        A no-op unless DeepSpeed is imported (every ZeRO-3 run imports it before building the model;
        `HybridGRPOTrainer` calls this again for a model built before)."""
        if "deepspeed" not in sys.modules:
            return
        import deepspeed

        for param in (self.dt_proj.bias, self.conv1d.weight, self.conv1d.bias):
            if param is not None:
                deepspeed.zero.register_external_parameter(self, param)

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
        padding: Padding | None = None,  # real tokens among cached + new positions (its last T columns are these)
        state: MambaState | None = None,  # continued from (unless empty), and updated in place, when given
        decode: DecodeColumns | None = None,  # one token per row (T == 1): the decode step
        state_is_empty: bool = False,  # `state` holds nothing yet (a fresh cache): the scan starts from zero
    ) -> torch.Tensor:
        if decode is not None:
            return self.step(hidden_states[:, 0], state=state)[:, None]
        Bsz, T, _ = hidden_states.shape
        z, x, Bm, Cm, dt = self._project(hidden_states)  # x: (B, T, Di)
        dt = self._dt(dt)  # (B, T, Di) float32
        valid = None
        if padding is not None:
            valid = padding.mask[:, -T:]  # (B, T) bool
            x = x * valid[..., None].to(x.dtype)
            dt = dt * valid[..., None]
        x = self._conv(x, state, state_is_empty, valid)  # (B, T, Di)
        H, P = self.num_heads, self.d_state
        y, final_state = selective_scan(
            x.view(Bsz, T, H, P),
            dt.view(Bsz, T, H, P),
            self._A(),
            Bm,
            Cm,
            initial_state=None if state is None or state_is_empty else state.ssm,
            return_final_state=True,
            impl=self.scan_impl,
        )  # (B, T, H, P), (B, H, P, N)
        if state is not None:
            if records_grad(final_state):  # training through a cached prefix: keep the saved initial state intact
                state.ssm = final_state
            else:
                state.ssm.copy_(final_state)
        return self._output(y.reshape(Bsz, T, -1), x, z)

    def _conv(
        self, x: torch.Tensor, state: MambaState | None, state_is_empty: bool, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Causal depthwise conv + SiLU over time; x (B, T, Di). Continues from, and updates, `state.conv`: the last
        d_conv inputs up to each row's last real token (`valid` (B, T), None: all real)."""
        K = self.d_conv
        xt = x.transpose(1, 2)  # (B, Di, T)
        kernel = causal_conv1d_fn is not None and x.is_cuda and (state is None or state_is_empty)
        if state is None and kernel:
            return causal_conv1d_fn(xt.contiguous(), self.conv1d.weight[:, 0], self.conv1d.bias,
                                    activation="silu").transpose(1, 2)
        past = xt.new_zeros(xt.shape[0], xt.shape[1], K) if state is None or state_is_empty else state.conv.to(xt.dtype)
        full = torch.cat([past, xt], dim=-1)  # (B, Di, K + T): input i of this call at column K + i
        if state is not None:
            if valid is None:
                new_state = full[..., -K:]
            else:  # the K inputs ending at each row's last real token (its old state if it has none here)
                T = xt.shape[-1]
                end = (valid.long() * torch.arange(1, T + 1, device=valid.device)).amax(1)  # (B,) real inputs used
                index = (end[:, None] + torch.arange(K, device=end.device))[:, None, :]  # (B, 1, K)
                new_state = full.gather(2, index.expand(-1, full.shape[1], -1))  # (B, Di, K)
            if records_grad(full):
                state.conv = new_state
            else:
                state.conv.copy_(new_state)
        if kernel:
            return causal_conv1d_fn(xt.contiguous(), self.conv1d.weight[:, 0], self.conv1d.bias,
                                    activation="silu").transpose(1, 2)
        out = F.conv1d(full[..., 1:], self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)  # (B, Di, T)
        return F.silu(out).transpose(1, 2)

    # ---- one-token decode ---------------------------------------------------------------------------------------

    def step(self, hidden_states: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """One decode token per row: hidden_states (B, D) -> (B, D), `state` advanced in place."""
        if state is None:
            raise ValueError(f"layer {self.layer_idx}: step() needs a state (see allocate_inference_cache)")
        Bsz = hidden_states.shape[0]
        z, x, Bm, Cm, dt = self._project(hidden_states)  # x: (B, Di); B, C: (B, H, N)
        weight = self.conv1d.weight[:, 0]  # (Di, K)
        if causal_conv1d_update is not None and x.is_cuda:
            x = causal_conv1d_update(x, state.conv, weight, self.conv1d.bias, "silu")
        else:
            conv = state.conv
            conv[:, :, :-1] = conv[:, :, 1:].clone()  # shift the window by one input
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
