"""Teacher -> hybrid conversion: exact logits for "t" layers, MIL placement for "m2", errors, checkpoints on disk."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from h1rl.models import AprielHybridSSMForCausalLM, HybridForCausalLM
from h1rl.models.convert import (
    SUPPORTED_TEACHERS,
    convert_teacher,
    convert_to_directory,
    hybrid_config_from_teacher,
    save_apriel_checkpoint,
    transfer_weights,
)

VOCAB = 128
DIMS = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
TEACHERS = {
    "llama": lambda n: LlamaForCausalLM(LlamaConfig(num_hidden_layers=n, **DIMS)),
    "llama_bias_tied_rope3": lambda n: LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=n,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3_ROPE,
            **DIMS,
        )
    ),
    "mistral_sliding": lambda n: MistralForCausalLM(MistralConfig(num_hidden_layers=n, sliding_window=5, **DIMS)),
    "qwen2": lambda n: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=n, **DIMS)),
    "qwen3_bias": lambda n: Qwen3ForCausalLM(
        Qwen3Config(num_hidden_layers=n, head_dim=16, attention_bias=True, **DIMS)
    ),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (norm weights near 1, biases non-zero) so that an uncopied tensor shows up."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.15)
    return model.eval()


def make_teacher(kind: str, num_layers: int = 3) -> torch.nn.Module:
    return randomize_(TEACHERS[kind](num_layers))


def teacher_logits(teacher: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # HF teachers take positions from position_ids only; h1rl derives them from the mask.
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return teacher(ids, attention_mask=mask, position_ids=position_ids).logits


@pytest.mark.parametrize("kind", list(TEACHERS))
@torch.no_grad()
def test_all_attention_hybrid_reproduces_teacher_logits(kind):
    teacher = make_teacher(kind)
    hybrid = convert_teacher(teacher, ["t"] * 3, seed=0).eval()
    ids = torch.randint(1, VOCAB, (2, 12))
    plain = hybrid(ids).logits
    assert (plain - teacher(ids).logits).abs().max() <= 1e-5

    ids, mask = left_padded_batch([12, 7, 3], vocab=VOCAB)
    real = mask.bool()
    got = hybrid(ids, attention_mask=mask).logits
    assert (got[real] - teacher_logits(teacher, ids, mask)[real]).abs().max() <= 1e-5


def test_config_copies_teacher_fields():
    llama = LlamaConfig(
        num_hidden_layers=2,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=LLAMA3_ROPE,
        eos_token_id=[2, 5],
        **DIMS,
    )
    cfg = hybrid_config_from_teacher(llama, "t, m2")
    assert cfg.hybrid_block_layout == ["t", "m2"]
    assert cfg.attention_bias and cfg.mlp_bias and not cfg.attention_qkv_bias and not cfg.attention_qk_norm
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0
    assert cfg.eos_token_id == [2, 5] and cfg.sliding_window is None
    assert (cfg.ssm_cfg["d_inner"], cfg.ssm_cfg["d_xb"], cfg.ssm_cfg["d_state"]) == (64, 32, 16)

    qwen2 = hybrid_config_from_teacher(
        Qwen2Config(num_hidden_layers=2, rope_parameters={"rope_theta": 1e6}, **DIMS), "t,t"
    )
    assert qwen2.attention_qkv_bias and not qwen2.attention_bias and qwen2.rope_parameters["rope_theta"] == 1e6
    qwen3 = hybrid_config_from_teacher(Qwen3Config(num_hidden_layers=2, head_dim=32, **DIMS), ["t", "t"])
    assert qwen3.attention_qk_norm and qwen3.head_dim == 32
    assert (qwen3.ssm_cfg["d_inner"], qwen3.ssm_cfg["d_xb"]) == (128, 64)
    mistral = hybrid_config_from_teacher(MistralConfig(num_hidden_layers=2, sliding_window=7, **DIMS), "t,t")
    assert mistral.sliding_window == 7


M2_FRESH = {"in_proj.weight[0:64]", "dt_in_proj.weight", "dt_proj.weight", "dt_proj.bias", "conv1d.weight",
            "conv1d.bias", "A_log", "D"}  # fmt: skip


@torch.no_grad()
def test_m2_layers_get_mil_weights_and_mamba_init(caplog):
    teacher = make_teacher("qwen3_bias", num_layers=4)
    layout = ["t", "m2", "i", "m2"]
    hybrid = HybridForCausalLM(hybrid_config_from_teacher(teacher.config, layout))
    with caplog.at_level(logging.WARNING, logger="h1rl.models.convert"):
        report = transfer_weights(teacher, hybrid)
    t_sd, h_sd = teacher.state_dict(), hybrid.state_dict()
    ssm = hybrid.config.ssm
    Di, Dxb = ssm.d_inner, ssm.d_xb
    for i in (1, 3):
        attn, mixer = teacher.model.layers[i].self_attn, hybrid.model.layers[i].mixer
        W = mixer.in_proj.weight
        assert torch.equal(W[Di : Di + Dxb], attn.v_proj.weight)
        assert torch.equal(W[Di + Dxb : Di + 2 * Dxb], attn.k_proj.weight)
        assert torch.equal(W[Di + 2 * Dxb :], attn.q_proj.weight)
        assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        assert not torch.equal(W[:Di], attn.q_proj.weight)
        assert torch.equal(mixer.A_log, torch.log(torch.arange(1, ssm.d_state + 1.0)).expand(Di, -1))
        assert torch.equal(mixer.D, torch.ones(Di))
        dt = F.softplus(mixer.dt_proj.bias)
        assert dt.min() >= ssm.dt_min * (1 - 1e-5) and dt.max() <= ssm.dt_max * (1 + 1e-5)
        prefix = f"model.layers.{i}."
        assert {k[len(prefix + "mixer.") :] for k in report.initialised if k.startswith(prefix)} == M2_FRESH
        for key in t_sd:  # MLP and norms copied; biases and q/k norms dropped
            if key.startswith((prefix + "mlp.", prefix + "input_layernorm", prefix + "post_attention_layernorm")):
                assert torch.equal(h_sd[key], t_sd[key]), key
            if key.startswith(prefix + "self_attn.") and ("bias" in key or "norm" in key):
                assert key in report.dropped
    assert torch.equal(hybrid.model.layers[0].self_attn.q_norm.weight, teacher.model.layers[0].self_attn.q_norm.weight)
    assert not any(k.startswith("model.layers.2.") for k in h_sd)
    assert {k for k in t_sd if k.startswith("model.layers.2.")} <= set(report.dropped)
    assert all(".mixer." in k for k in report.initialised)
    assert "model.layers.0.self_attn.q_proj.bias" in report.copied
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "q_norm.weight" in warned and "q_proj.bias" in warned and "[1, 3]" in warned


@torch.no_grad()
def test_m2_with_ssm_bias_carries_attention_biases():
    teacher = make_teacher("qwen2", num_layers=2)
    hybrid = convert_teacher(teacher, "m2,t", ssm_cfg={"bias": True, "d_state": 8})
    attn, mixer = teacher.model.layers[0].self_attn, hybrid.model.layers[0].mixer
    Di, Dxb = 64, 32
    assert mixer.d_state == 8
    assert torch.equal(mixer.in_proj.bias[Di : Di + Dxb], attn.v_proj.bias)
    assert torch.equal(mixer.in_proj.bias[Di + Dxb : Di + 2 * Dxb], attn.k_proj.bias)
    assert torch.equal(mixer.in_proj.bias[Di + 2 * Dxb :], attn.q_proj.bias)


@torch.no_grad()
def test_seed_makes_fresh_init_reproducible_and_dtype_applies():
    teacher = make_teacher("llama", num_layers=2)
    a = convert_teacher(teacher, "m2,m2", seed=1)
    b = convert_teacher(teacher, "m2,m2", seed=1)
    c = convert_teacher(teacher, "m2,m2", seed=2)
    z = slice(0, 64)
    assert torch.equal(a.model.layers[0].mixer.in_proj.weight[z], b.model.layers[0].mixer.in_proj.weight[z])
    assert not torch.equal(a.model.layers[0].mixer.in_proj.weight[z], c.model.layers[0].mixer.in_proj.weight[z])
    half = convert_teacher(teacher, "t,m2", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(
        half.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight.bfloat16()
    )


def test_unsupported_teacher_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"gpt2.*not supported.*llama.*mistral.*qwen2.*qwen3"):
        hybrid_config_from_teacher(GPT2Config(), ["t"] * 12)
    PhiConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'phi'.*supported teachers"):
        convert_to_directory(tmp_path, "t,t", tmp_path / "out")
    assert set(SUPPORTED_TEACHERS) == {"llama", "mistral", "qwen2", "qwen3"}


def test_bad_layout_and_ssm_cfg_are_named():
    cfg = LlamaConfig(num_hidden_layers=4, **DIMS)
    with pytest.raises(ValueError, match=r"layout has 3 entries but the teacher has 4 layers"):
        hybrid_config_from_teacher(cfg, "t,m2,t")
    with pytest.raises(ValueError, match=r"hybrid_block_layout\[1\].*'m3'"):
        hybrid_config_from_teacher(cfg, "t,m3,t,t")
    with pytest.raises(ValueError, match=r"d_xb.*not divisible by d_state=64"):
        hybrid_config_from_teacher(cfg, "t,m2,t,t", {"d_state": 64})
    with pytest.raises(ValueError, match=r"ssm_cfg.d_inner=128 .*needs d_inner=64"):
        hybrid_config_from_teacher(cfg, "t,m2,t,t", {"d_inner": 128})
    sliding_qwen = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, **DIMS)
    with pytest.raises(ValueError, match=r"sliding-window attention in layer\(s\) \[2, 3\]"):
        hybrid_config_from_teacher(sliding_qwen, ["t"] * 4)


def test_every_teacher_tensor_must_find_a_place():
    teacher = make_teacher("llama", num_layers=2)
    teacher.model.extra_scale = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match=r"neither copied nor dropped: \['model.extra_scale'\]"):
        convert_teacher(teacher, "t,m2")
    teacher = make_teacher("llama", num_layers=2)
    teacher.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(KeyError, match=r"no tensor 'model.layers.1.self_attn.sinks'"):
        convert_teacher(teacher, "t,t")


@torch.no_grad()
def test_convert_to_directory_round_trip(tmp_path):
    teacher = make_teacher("mistral_sliding", num_layers=4)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    (teacher_dir / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (teacher_dir / "chat_template.jinja").write_text("{{ messages }}")
    layout = "t,m2,i,m2"
    out = convert_to_directory(teacher_dir, layout, tmp_path / "hybrid", seed=3)
    assert json.loads((out / "config.json").read_text())["model_type"] == "h1rl_hybrid"
    assert (out / "model.safetensors").is_file()
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, HybridForCausalLM) and loaded.config.hybrid_block_layout == layout.split(",")
    in_memory = convert_teacher(teacher_dir, layout, seed=3).eval()
    ids, mask = left_padded_batch([10, 4], vocab=VOCAB)
    assert torch.equal(loaded(ids, attention_mask=mask).logits, in_memory(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_save_apriel_checkpoint_reloads_identically(tmp_path, tied):
    kind = "llama_bias_tied_rope3" if tied else "qwen3_bias"
    hybrid = convert_teacher(make_teacher(kind), "m2,t,m2", seed=0).eval()
    out = save_apriel_checkpoint(hybrid, tmp_path / "apriel")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "apriel_hybrid_ssm" and config["architectures"] == ["AprielHybridSSMForCausalLM"]
    assert config["hybrid_block_layout"] == ["m2", "t", "m2"] and config["ssm_cfg"]["d_state"] == 16
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, AprielHybridSSMForCausalLM)
    assert loaded.config.tie_word_embeddings == tied
    ids = torch.randint(1, VOCAB, (2, 9))
    assert torch.equal(loaded(ids).logits, hybrid(ids).logits)
    assert not math.isnan(loaded(ids).logits.sum().item())
    with pytest.raises(ValueError, match=r"'h1rl_hybrid' is not an Apriel-H1 model type"):
        save_apriel_checkpoint(hybrid, tmp_path / "bad", model_type="h1rl_hybrid")
