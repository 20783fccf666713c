"""Layer surgery: swapping attention to MIL-initialised m2 keeps everything else, agrees with convert; skipping."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from h1rl.distill.swap import layout_of, skip_layer, swap_to_mamba
from h1rl.models import HybridForCausalLM
from h1rl.models.convert import convert_teacher


def teacher(layers=4):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


def test_swap_keeps_other_weights_and_matches_convert():
    t = teacher()
    student = convert_teacher(t, ["t", "t", "m2", "t"], ssm_cfg={"d_state": 16}, seed=0)
    with torch.no_grad():  # the student has moved away from the teacher: MIL must use its current attention
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    swapped = swap_to_mamba(student, [1, 3], seed=5)
    assert layout_of(swapped) == ["t", "m2", "m2", "m2"] and layout_of(student) == ["t", "t", "m2", "t"]
    assert isinstance(swapped, HybridForCausalLM)
    before, after = student.state_dict(), swapped.state_dict()
    for key, value in after.items():
        if key.startswith(("model.layers.1.mixer.", "model.layers.3.mixer.")):
            continue
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)  # incl. layer 2's trained mixer
    assert not any(k.startswith(("model.layers.1.self_attn", "model.layers.3.self_attn")) for k in after)

    # convert's MIL mapping applied to the same attention weights gives the same copied tensors
    for i in (1, 3):
        attn = student.model.layers[i].self_attn
        for name, proj in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                           ("o_proj", attn.o_proj)):
            t.model.layers[i].self_attn.get_submodule(name).weight.data.copy_(proj.weight)
    reference = convert_teacher(t, ["t", "m2", "t", "m2"], ssm_cfg={"d_state": 16}, seed=5)
    for i in (1, 3):
        ours, ref = swapped.model.layers[i].mixer, reference.model.layers[i].mixer
        Di = ours.d_inner
        torch.testing.assert_close(ours.in_proj.weight[Di:], ref.in_proj.weight[Di:], rtol=0, atol=0)
        torch.testing.assert_close(ours.out_proj.weight, ref.out_proj.weight, rtol=0, atol=0)
        torch.testing.assert_close(ours.A_log, ref.A_log)  # fresh A = 1..N in both
        assert not torch.equal(ours.in_proj.weight[:Di], before[f"model.layers.{i}.self_attn.q_proj.weight"])

    ids = torch.randint(1, 61, (2, 9))
    assert torch.isfinite(swapped(ids).logits).all()


def test_swap_is_seeded_and_rejects_bad_layers():
    student = convert_teacher(teacher(), ["t", "t", "m2", "t"], ssm_cfg={"d_state": 16})
    a, b = swap_to_mamba(student, [0], seed=3), swap_to_mamba(student, [0], seed=3)
    torch.testing.assert_close(a.model.layers[0].mixer.dt_proj.bias, b.model.layers[0].mixer.dt_proj.bias)
    with pytest.raises(ValueError, match="layer 2 is 'm2', not an attention"):
        swap_to_mamba(student, [2])
    with pytest.raises(ValueError, match="layer 4 is out of range: the model has 4 layers"):
        swap_to_mamba(student, [4])


def test_skip_layer_is_identity_block_and_restores():
    student = convert_teacher(teacher(), ["t", "t", "m2", "t"], ssm_cfg={"d_state": 16}).eval()
    ids = torch.randint(1, 61, (2, 7))
    full = student(ids).logits
    with skip_layer(student, 1):
        skipped = student(ids).logits
    # the same model built with "i" at layer 1
    fields = {k: v for k, v in student.config.to_dict().items() if k not in ("model_type", "architectures",
                                                                                "transformers_version")}
    fields["hybrid_block_layout"] = ["t", "i", "m2", "t"]
    ref = HybridForCausalLM(type(student.config)(**fields)).eval()
    ref.load_state_dict({k: v for k, v in student.state_dict().items() if not k.startswith("model.layers.1.")})
    torch.testing.assert_close(skipped, ref(ids).logits)
    assert not torch.allclose(skipped, full)
    torch.testing.assert_close(student(ids).logits, full)  # restored
