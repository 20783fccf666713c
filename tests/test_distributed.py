"""h1rl.distributed: bundled DeepSpeed configs take their batch fields from the run, launcher arguments, set-up.

The multi-process behaviour itself (world size 2, ranks equal, equal to one process) is in tests/zero/.
"""

from __future__ import annotations

import json

import pytest
from transformers import TrainingArguments

from h1rl.distributed import (
    DEEPSPEED_CONFIGS,
    deepspeed_config_path,
    prepare_training_kwargs,
    strip_launcher_args,
)


@pytest.mark.parametrize("name", DEEPSPEED_CONFIGS)
def test_bundled_configs_take_batch_fields_from_the_run(name, tmp_path):
    path = deepspeed_config_path(name)
    raw = json.loads(open(path).read())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert raw[key] == "auto", f"{name}.json: {key} must be 'auto' (filled from the run's config)"
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=path, per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=3e-4, weight_decay=0.1,
                             use_cpu=True)
    filled = args.hf_deepspeed_config.config
    assert filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["gradient_clipping"] == 0.5
    assert filled["train_batch_size"] == 6  # x world size 1
    stage = filled["zero_optimization"]["stage"]
    assert stage == (2 if name == "zero2" else 3)
    if name == "zero3_offload":
        assert filled["optimizer"]["params"]["lr"] == 3e-4 and filled["optimizer"]["params"]["weight_decay"] == 0.1
        assert filled["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    if stage == 3:  # `save_model` writes whole weights that from_pretrained can load
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_config_names_paths_and_errors(tmp_path):
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert deepspeed_config_path(str(own)) == str(own)
    assert deepspeed_config_path(None) is None
    with pytest.raises(FileNotFoundError, match="zero4.*zero2, zero3, zero3_offload"):
        deepspeed_config_path("zero4")


def test_launcher_arguments_are_dropped():
    argv = ["--local_rank=1", "grpo", "--config", "r.yaml", "--local-rank", "0", "--max_steps", "2"]
    assert strip_launcher_args(argv) == ["grpo", "--config", "r.yaml", "--max_steps", "2"]


def test_single_process_needs_no_set_up(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert prepare_training_kwargs("zero2") == {}


def test_memory_estimate_counts_the_real_model():
    from h1rl.bench.memory import Shape, estimate, parameter_count

    s = Shape(hidden=64, layers=4, m2_layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=100,
              d_state=8, d_inner=64, d_xb=32, d_conv=4)
    dt_rank = -(-s.hidden // 16)
    attention = s.hidden * s.heads * s.head_dim * 2 + s.hidden * s.kv_heads * s.head_dim * 2
    m2 = (s.hidden * (2 * s.d_inner + 2 * s.d_xb)  # in_proj
          + s.hidden * dt_rank + dt_rank * s.d_inner + s.d_inner  # dt_in_proj, dt_proj + bias
          + s.d_inner * s.d_conv + s.d_inner  # depthwise conv1d + bias
          + s.d_inner * s.d_state + s.d_inner  # A_log, D
          + s.d_inner * s.hidden)  # out_proj
    mlp_norms = 3 * s.hidden * s.intermediate + 2 * s.hidden
    count = parameter_count(s)
    layers = (s.layers - s.m2_layers) * attention + s.m2_layers * m2 + s.layers * mlp_norms
    assert count == layers + 2 * s.vocab * s.hidden + s.hidden  # untied embeddings + final norm
    rows = {what: gib for what, _, gib in estimate(s, gpus=4, micro_batch=1, seq_len=16, rollout_rows=2,
                                                   reference_model=False)}
    assert rows["ZeRO-3: all sharded"] * 2**30 == 16 * count / 4
