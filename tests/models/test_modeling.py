"""HybridForCausalLM: decode vs full forward, padding, generation, dtypes, checkpointing, save/load, bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, tiny_config, tiny_model

from h1rl.models import HybridConfig, HybridForCausalLM


def real_positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()


@torch.no_grad()
def test_teacher_forced_decode_equals_full_forward(layout):
    model = tiny_model(layout)
    lengths = [11, 5, 8, 2]
    ids, mask = left_padded_batch(lengths)
    prompt_len = 6  # some rows are all padding in the prompt part, one row starts inside it
    full = model(ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)

    cache = model.allocate_cache(ids.shape[0], ids.shape[1])
    pieces = [model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], cache=cache, use_cache=True).logits]
    for t in range(prompt_len, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
    stepped = torch.cat(pieces, dim=1)
    real = real_positions(mask)
    assert (stepped[real] - full[real]).abs().max() <= 1e-4


@torch.no_grad()
def test_chunked_prefill_continuation_equals_full_forward(layout):
    model = tiny_model(layout)
    ids, mask = left_padded_batch([12, 7, 12])
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = model.allocate_cache(ids.shape[0], 4)  # too small on purpose: the KV buffers must grow
    first = model(ids[:, :5], attention_mask=mask[:, :5], cache=cache, use_cache=True).logits
    second = model(ids[:, 5:], attention_mask=mask, cache=cache, use_cache=True).logits
    real = real_positions(mask)
    assert (torch.cat([first, second], 1)[real] - full[real]).abs().max() <= 1e-4


@torch.no_grad()
def test_left_padded_rows_equal_rows_alone(layout):
    model = tiny_model(layout)
    lengths = [9, 3, 6]
    ids, mask = left_padded_batch(lengths)
    batched = model(ids, attention_mask=mask).logits
    for i, n in enumerate(lengths):
        alone = model(ids[i : i + 1, -n:]).logits[0]
        assert (batched[i, -n:] - alone).abs().max() <= 1e-5, f"row {i}"


@torch.no_grad()
def test_generate_greedy_left_padded_equals_alone(layout):
    model = tiny_model(layout)
    lengths = [7, 3]
    ids, mask = left_padded_batch(lengths)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 8)
    for i, n in enumerate(lengths):
        alone = model.generate(ids[i : i + 1, -n:], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, ids.shape[1] :], alone[0, n:]), f"row {i}"


@torch.no_grad()
def test_generate_greedy_equals_manual_argmax_loop():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(6):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_generate_sampling_is_seeded():
    model = tiny_model()
    ids = torch.randint(1, 97, (3, 4))
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20, pad_token_id=0)
    torch.manual_seed(3)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(3)
    b = model.generate(ids, **kwargs)
    assert torch.equal(a, b)


@torch.no_grad()
def test_bfloat16_forward_and_generate_are_close_to_float32():
    model = tiny_model()
    ids, mask = left_padded_batch([8, 5])
    ref = model(ids, attention_mask=mask).logits
    model_bf16 = model.to(torch.bfloat16)
    logits = model_bf16(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    real = real_positions(mask)
    assert (logits.float()[real] - ref[real]).abs().max() < 0.1
    out = model_bf16.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(["t", "m2", "m2"]).train()
    ids = torch.randint(1, 97, (2, 12))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers if layer.code != "i")
    checkpointed = grads()
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6), name


def test_gradients_reach_every_parameter():
    model = tiny_model().train()
    ids = torch.randint(1, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_save_and_load_roundtrip(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "h1rl_hybrid"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridForCausalLM
    ids, mask = left_padded_batch([6, 4])
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


# ---- Apriel-H1 format -------------------------------------------------------------------------------------------


def reference_m2_mixer(w: dict[str, torch.Tensor], h: torch.Tensor, ssm: dict) -> torch.Tensor:
    """The Apriel-H1 m2 mixer written out token by token from DESIGN.md, independent of h1rl's code. h: (T, D)."""
    Di, Dxb, N, K = ssm["d_inner"], ssm["d_xb"], ssm["d_state"], ssm["d_conv"]
    rep = Di // Dxb
    zxbc = h @ w["in_proj.weight"].T
    z, x, B, C = zxbc.split([Di, Dxb, Dxb, Di], dim=-1)
    x = x.view(-1, Dxb // N, N).repeat_interleave(rep, dim=1).reshape(-1, Di)  # group g -> heads g*rep..g*rep+rep-1
    B = B.view(-1, Dxb // N, N).repeat_interleave(rep, dim=1)  # (T, H, N)
    C = C.view(-1, Di // N, N)  # (T, H, N)
    dt = (h @ w["dt_in_proj.weight"].T) @ w["dt_proj.weight"].T + w["dt_proj.bias"]
    dt = F.softplus(dt + w["dt_proj.bias"])  # the bias counts twice
    conv_w, conv_b = w["conv1d.weight"][:, 0], w["conv1d.bias"]
    T = h.shape[0]
    xc = torch.zeros_like(x)
    for t in range(T):
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                xc[t] += conv_w[:, k] * x[src]
    xc = F.silu(xc + conv_b)
    A = -torch.exp(w["A_log"])  # (Di, N)
    s = torch.zeros(Di, N)
    ys = []
    for t in range(T):
        head = torch.arange(Di) // N  # channel c uses B/C group c // d_state
        s = torch.exp(dt[t][:, None] * A) * s + dt[t][:, None] * B[t][head] * xc[t][:, None]
        ys.append((s * C[t][head]).sum(-1) + w["D"] * xc[t])
    y = torch.stack(ys) * F.silu(z)
    return y @ w["out_proj.weight"].T


def write_apriel_checkpoint(path, layout, model_type="apriel_hybrid_ssm") -> dict:
    """A tiny checkpoint laid out like a published Apriel-H1 one: Mistral config + layout + ssm_cfg."""
    import json

    from safetensors.torch import save_file

    D, Di, Dxb, N, R, K, V, I, H, Hkv = 32, 32, 16, 8, 4, 4, 50, 48, 4, 2
    P = D // H
    ssm = {"d_state": N, "d_inner": Di, "d_xb": Dxb, "d_conv": K, "dt_rank": R, "expand": 1, "activation": "silu",
           "bias": False, "conv_bias": True, "dt_proj_bias": True, "repeat_kv_before_conv": True, "dt_scale": 1.0,
           "dt_min": 0.001, "dt_max": 0.1, "dt_init": "random", "dt_init_floor": 1e-4,
           "n_qk_heads": 4, "n_v_heads": 4, "chunk_size": 128}  # discrete-Mamba2 keys, ignored by m2
    config = {
        "architectures": ["AprielHybridSSMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_apriel_hybrid_ssm.AprielHybridSSMConfig",
                     "AutoModelForCausalLM": "modeling_apriel_hybrid_ssm.AprielHybridSSMForCausalLM"},
        "model_type": model_type, "hidden_size": D, "intermediate_size": I, "num_hidden_layers": len(layout),
        "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": P, "vocab_size": V, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "max_position_embeddings": 128, "sliding_window": None, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "hybrid_block_layout": layout, "ssm_cfg": ssm,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    r = lambda *shape: torch.randn(*shape) * 0.2  # noqa: E731
    w = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": 1 + r(D), "lm_head.weight": r(V, D)}
    for i, code in enumerate(layout):
        p = f"model.layers.{i}."
        if code == "i":
            continue
        w |= {p + "mlp.gate_proj.weight": r(I, D), p + "mlp.up_proj.weight": r(I, D),
              p + "mlp.down_proj.weight": r(D, I), p + "input_layernorm.weight": 1 + r(D),
              p + "post_attention_layernorm.weight": 1 + r(D)}
        if code == "t":
            w |= {p + "self_attn.q_proj.weight": r(H * P, D), p + "self_attn.k_proj.weight": r(Hkv * P, D),
                  p + "self_attn.v_proj.weight": r(Hkv * P, D), p + "self_attn.o_proj.weight": r(D, H * P)}
        else:
            m = p + "mixer."
            w |= {m + "in_proj.weight": r(2 * Di + 2 * Dxb, D), m + "dt_in_proj.weight": r(R, D),
                  m + "dt_proj.weight": r(Di, R), m + "dt_proj.bias": torch.empty(Di).uniform_(-4, -1),
                  m + "conv1d.weight": r(Di, 1, K), m + "conv1d.bias": r(Di),
                  m + "A_log": torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(Di, 1) + r(Di, N),
                  m + "D": 1 + r(Di), m + "out_proj.weight": r(D, Di)}
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
    return {"weights": w, "ssm": ssm}


@pytest.mark.parametrize("model_type", ["apriel_hybrid_ssm", "apriel_ssm_thinker_hybrid"])
def test_apriel_checkpoint_loads_matches_reference_and_roundtrips(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    layout = ["t", "m2", "i", "m2"]
    written = write_apriel_checkpoint(tmp_path / "apriel", layout, model_type)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "apriel", output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.model_type == model_type

    # the m2 mixer computes exactly what the reference semantics say
    w = written["weights"]
    h = torch.randn(7, 32)
    mixer_w = {k.split("mixer.")[1]: v for k, v in w.items() if k.startswith("model.layers.1.mixer.")}
    with torch.no_grad():
        ours = model.model.layers[1].mixer(h[None])[0]
    assert (ours - reference_m2_mixer(mixer_w, h, written["ssm"])).abs().max() <= 1e-5

    # save in the same format, reload, identical logits
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert again.config.model_type == model_type
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hybrid_block_layout=["t", "x"]), r"hybrid_block_layout\[1\]: unknown layer code 'x'"),
        (dict(hybrid_block_layout=["t", "m2d"]), r"discrete Mamba-2 is not supported"),
        (dict(hybrid_block_layout=["t", "m2", "t"]), r"hybrid_block_layout has 3 entries but num_hidden_layers is 2"),
        (dict(ssm_cfg={"d_inner": 60, "d_state": 16}), r"ssm_cfg.d_inner: 60 is not divisible by d_state=16"),
        (dict(ssm_cfg={"d_xb": 24, "d_state": 16}), r"ssm_cfg.d_xb: 24 is not divisible by d_state=16"),
        (dict(ssm_cfg={"d_inner": 64, "d_xb": 48, "d_state": 16}), r"ssm_cfg.d_inner: 64 is not divisible by d_xb=48"),
        (dict(ssm_cfg={"dstate": 16}), r"ssm_cfg: unknown key\(s\) \['dstate'\]"),
        (dict(ssm_cfg={"repeat_kv_before_conv": False}), r"ssm_cfg.repeat_kv_before_conv"),
    ],
)
def test_bad_configs_name_the_field(overrides, message):
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
                  hybrid_block_layout=["t", "m2"])
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        HybridConfig(**kwargs)


def test_mask_of_wrong_length_is_refused():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 6))
    with pytest.raises(ValueError, match="attention_mask has 5 columns; expected 6"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_config_roundtrip_keeps_every_field(tmp_path):
    cfg = tiny_config(["m2", "t"], attention_qkv_bias=True, attention_qk_norm=True, sliding_window=16)
    cfg.save_pretrained(tmp_path)
    again = HybridConfig.from_pretrained(tmp_path)
    for field in ("hybrid_block_layout", "ssm_cfg", "attention_qkv_bias", "attention_qk_norm", "sliding_window"):
        assert getattr(again, field) == getattr(cfg, field), field
