"""h1rl.config_io: YAML -> typed dataclasses, overrides, coercion, errors naming the dotted key, save/load cycle."""

from __future__ import annotations

import dataclasses
import doctest
from typing import Any, Literal

import pytest
import yaml

import h1rl.config_io
from h1rl.config_io import ConfigError, apply_overrides, diff_keys, load_config, save_config, to_dict


@dataclasses.dataclass
class Inner:
    size: int = 4
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size: must be >= 1, got {self.size}")


@dataclasses.dataclass
class Item:
    steps: int
    layers: list[int] | None = None


@dataclasses.dataclass
class Outer:
    name: str
    items: list[Item]
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False
    limit: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    pair: tuple[int, ...] = (1, 2)


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_nested_load_coercion_and_overrides(tmp_path):
    path = write(tmp_path, {"name": "run", "items": [{"steps": 3}, {"steps": 5, "layers": [1, 2]}],
                            "inner": {"rate": "1e-4"}})  # YAML 1.1 reads 1e-4 as text: coerced to float
    cfg = load_config(Outer, path, ["inner.size=8", "items.1.steps=7", "flag=true", "limit=null", "extra.k=[1, 2]",
                                    "pair=[3, 4]"])
    assert cfg == Outer(name="run", items=[Item(3), Item(7, [1, 2])], inner=Inner(size=8, rate=1e-4), flag=True,
                        limit=None, extra={"k": [1, 2]}, pair=(3, 4))
    assert isinstance(cfg.inner.rate, float) and isinstance(cfg.items[0], Item)
    assert load_config(Outer, path, ["inner.rate=2"]).inner.rate == 2.0  # int -> float


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.sise=3"], "unknown key 'inner.sise' (did you mean 'size'?); allowed keys under 'inner': size, rate"),
        (["items.1.stepz=3"], "unknown key 'items.1.stepz'"),
        (["colour=red"], "unknown key 'colour'; allowed keys: name, items, inner"),
        (["inner.size=many"], "inner.size: expected int, got 'many'"),
        (["inner.size=2.5"], "inner.size: expected int, got 2.5"),
        (["flag=1"], "flag: expected bool, got 1"),
        (["inner.mode=c"], "inner.mode: expected one of 'a', 'b', got 'c'"),
        (["items.0.layers=[1, x]"], "items.0.layers.1: expected int, got 'x'"),
        (["inner.size=0"], "inner: size: must be >= 1, got 0"),  # the dataclass's own validation, located
        (["items.5.steps=1"], "'items.5' is not an item of the list"),
        (["nonsense"], "expected key=value"),
    ],
)
def test_errors_name_the_key(tmp_path, overrides, message):
    path = write(tmp_path, {"name": "run", "items": [{"steps": 3}, {"steps": 5}]})
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    assert message in str(err.value)
    assert str(err.value).startswith(path) or "override" in str(err.value)


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'items.0.steps'"):
        load_config(Outer, data={"name": "x", "items": [{}]})
    with pytest.raises(ConfigError, match="missing required key 'items'"):
        load_config(Outer, data={"name": "x"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, bad)


def test_save_round_trip_and_diff(tmp_path):
    cfg = load_config(Outer, data={"name": "r", "items": [{"steps": 1, "layers": [0]}], "pair": [5]})
    saved = save_config(cfg, tmp_path / "out" / "resolved.yaml")
    text = saved.read_text()
    assert "rate: 0.1" in text and "mode: a" in text  # defaults are written too
    assert load_config(Outer, saved) == cfg
    changed = to_dict(load_config(Outer, saved, ["items.0.steps=2", "inner.mode=b"]))
    assert diff_keys(to_dict(cfg), changed) == ["items.0.steps", "inner.mode"]
    assert diff_keys(to_dict(cfg), to_dict(cfg)) == []


def test_overrides_do_not_touch_the_input():
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.b=2", "a.c.d=3"]) == {"a": {"b": 2, "c": {"d": 3}}}
    assert raw == {"a": {"b": 1}}


def test_docstring_example_runs():
    assert doctest.testmod(h1rl.config_io).failed == 0


def test_exponent_floats_reach_free_form_mappings_as_numbers(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; in `extra` (like DistillConfig's training.trainer_args) nothing would coerce it
    path = tmp_path / "cfg.yaml"
    path.write_text("name: x\nitems: []\nextra: {lr: 1e-4, steps: 10, big: 2E3, tag: 1e4x}\n")
    cfg = load_config(Outer, path, ["extra.lr2=3e-5", "inner.rate=5E-2"])
    assert cfg.extra == {"lr": 1e-4, "steps": 10, "big": 2000.0, "tag": "1e4x", "lr2": 3e-5}
    assert cfg.inner.rate == 0.05
