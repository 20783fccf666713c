"""The distillation config: recipes load into the typed config; bad schedules fail early with the stage named."""

from __future__ import annotations

import pytest

from h1rl import recipes
from h1rl.config_io import ConfigError, load_config
from h1rl.distill.config import DistillConfig, StageConfig, TrainingConfig, check_schedule, scorer_candidates

RECIPES = [r.path for r in recipes.list_recipes() if r.kind == "distill"]
T4 = ["t"] * 4


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_load_and_name_their_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and "h1rl distill --config " + recipe.stem in first
    cfg = load_config(DistillConfig, recipe)
    from h1rl.dry_run import model_config  # the teacher's config: local, bundled, or h1rl's copy of a hub model's

    check_schedule(cfg.stages, ["t"] * model_config(cfg.model.teacher)[0].num_hidden_layers)


def stages(*specs: dict) -> list[StageConfig]:
    return [StageConfig(**{"max_steps": 1, **s}) for s in specs]


@pytest.mark.parametrize(
    "plan, message",
    [
        ([{"layers": [1]}, {"layers": [4]}], "stage 2 (stages.1): layer 4 is out of range: the model has 4 layers"),
        ([{"layers": [-1]}], "layer -1 is out of range"),
        ([{"scorer": "loo", "num_layers": 5}], "swaps 5 layers by loo but only 4 attention layers are left"),
        ([{"scorer": "loo", "num_layers": 3}, {"scorer": "mmr", "num_layers": 2}],
         "stage 2 (stages.1): swaps 2 layers by mmr but only 1 attention layers are left"),
        ([{"layers": [2]}, {"layers": [2]}], "stage 2 (stages.1): layer 2 is not an attention layer any more"),
        ([{"scorer": "loo", "num_layers": 3}, {"layers": [0, 1]}],
         "swaps 3 layers by loo but only 2 attention layers are left to choose from ([2, 3], [0, 1] reserved"),
    ],
)
def test_bad_schedules_fail_with_the_stage_named(plan, message):
    with pytest.raises(ValueError) as err:
        check_schedule(stages(*plan), T4)
    assert message in str(err.value)


def test_later_explicit_layers_are_reserved():
    plan = stages({"scorer": "loo", "num_layers": 1}, {"layers": [0, 3]})
    check_schedule(plan, T4)
    assert scorer_candidates(plan, 0, T4) == [1, 2]
    assert scorer_candidates(plan, 0, ["t", "m2", "t", "t"]) == [2]


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.0.scorer=random", "stages.0: scorer: unknown scorer 'random'; use one of loo, mmr"),
        ("stages.0.layers=[1]", "stages.0: give either scorer (+ num_layers) or layers, not both"),
        ("stages.0.num_layers=0", "num_layers: a loo stage swaps at least 1 layer"),
        ("stages.0.max_step=3", "unknown key 'stages.0.max_step'"),
        ("loss.kind=jsd", "loss: kind: expected one of reverse_kl, forward_kl"),
        ("loss.chunk_bytes=0", "loss: chunk_bytes: must be >= 1, got 0"),
        ("loss.chunk_size=0", "loss: chunk_size: must be >= 1 (or unset: sized by chunk_bytes), got 0"),
        ("loss.chunk_tokens=64", "unknown key 'loss.chunk_tokens'"),
        ("training.trainer_args.optim_typo=1", "trainer_args.optim_typo: not a transformers.TrainingArguments"),
        ("training.trainer_args.max_steps=1", "trainer_args.max_steps: set by h1rl per stage"),
        ("stages=[]", "stages: give at least one stage"),
    ],
)
def test_bad_fields_name_the_key(override, message):
    data = {"output_dir": "x", "model": {"teacher": "t"}, "data": {"dataset_name": "d"},
            "stages": [{"scorer": "loo", "num_layers": 1, "max_steps": 3}]}
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, data=data, overrides=[override])
    assert message in str(err.value)


def test_stage_needs_a_choice():
    with pytest.raises(ValueError, match="give scorer"):
        StageConfig(max_steps=1)
    assert StageConfig(max_steps=1, layers=[]).layers == []  # distill only
    assert TrainingConfig(trainer_args={"dataloader_num_workers": 1}).trainer_args == {"dataloader_num_workers": 1}
