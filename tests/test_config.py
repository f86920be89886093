"""models/config.py: YAML -> nested dataclasses, strict keys and types, dotted overrides, round trip."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from models.config import ConfigError, apply_overrides, from_dict, load_config, save_resolved, to_dict


class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    sizes: tuple[int, ...] = (64, 64)
    pair: tuple[int, str] = (1, "a")


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    steps: int = 10
    flag: bool = False
    limit: float | None = None
    mode: Literal["fast", "slow"] = "fast"
    colour: Colour = Colour.RED
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class Required:
    needed: int


def test_yaml_file_to_nested_dataclass(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: exp\nsteps: 5\nflag: true\nlimit: 2\nmode: slow\ncolour: blue\ntags: [a, b]\n"
        "weights: {x: 1}\ninner:\n  lr: 0.01\n  sizes: [8, 16, 32]\n"
    )
    cfg = load_config(Outer, path)
    assert cfg == Outer(
        name="exp",
        steps=5,
        flag=True,
        limit=2.0,
        mode="slow",
        colour=Colour.BLUE,
        tags=["a", "b"],
        weights={"x": 1.0},
        inner=Inner(lr=0.01, sizes=(8, 16, 32)),
    )
    assert isinstance(cfg.limit, float) and isinstance(cfg.inner.sizes, tuple)
    # missing keys keep their defaults
    assert load_config(Outer, None) == Outer()


def test_unknown_keys_are_errors_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\].*valid keys: \['name', 'steps'"):
        from_dict(Outer, {"stepz": 3})
    with pytest.raises(
        ConfigError, match=r"inner: unknown key\(s\) \['learning_rate'\].*\['lr', 'sizes', 'pair'\]"
    ):
        from_dict(Outer, {"inner": {"learning_rate": 3}})
    with pytest.raises(
        ConfigError, match=r"unknown key 'inner.lrr' in inner; valid keys: \['lr', 'sizes', 'pair'\]"
    ):
        apply_overrides(Outer(), ["inner.lrr=1"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": 1.5}, "steps: expected an int"),
        ({"steps": True}, "steps: expected an int, got the bool"),
        ({"flag": 1}, "flag: expected a bool"),
        ({"mode": "medium"}, r"mode: 'medium' is not one of \['fast', 'slow'\]"),
        ({"colour": "green"}, r"colour: 'green' is not one of \['red', 'blue'\]"),
        ({"name": None}, "name: None is not allowed"),
        ({"inner": {"pair": [1, "a", 2]}}, r"inner.pair: expected 2 items, got 3"),
        ({"inner": 3}, "inner: expected a mapping for Inner"),
    ],
)
def test_wrong_types_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_required_fields_must_be_given():
    with pytest.raises(ConfigError, match="needed"):
        from_dict(Required, {})
    assert from_dict(Required, {"needed": 3}).needed == 3


def test_overrides_convert_strings_to_field_types():
    cfg = apply_overrides(
        Outer(),
        [
            "steps=20",
            "flag=true",
            "limit=3e-4",
            "inner.lr=1e-5",
            "inner.sizes=128,64",
            "tags=[x, y]",
            "mode=slow",
            "colour=blue",
            "weights={a: 2}",
            "name=with=equals",
        ],
    )
    assert cfg.steps == 20 and cfg.flag is True and cfg.limit == pytest.approx(3e-4)
    assert cfg.inner.lr == pytest.approx(1e-5) and cfg.inner.sizes == (128, 64)
    assert cfg.tags == ["x", "y"] and cfg.mode == "slow" and cfg.colour is Colour.BLUE
    assert cfg.weights == {"a": 2.0} and cfg.name == "with=equals"
    assert apply_overrides(cfg, ["limit=null"]).limit is None
    # the input is not modified (frozen dataclasses are replaced)
    assert Outer().steps == 10


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps", "must look like key.sub=value"),
        ("=3", "empty key"),
        ("steps=ten", "steps: expected an int"),
        ("flag=maybe", "flag: expected a bool"),
        ("name.sub=1", "is not a section"),
        ("inner.sizes=1,x", r"inner.sizes\[1\]: expected an int"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Outer(), [override])


def test_save_resolved_round_trips(tmp_path):
    cfg = Outer(
        name="r", limit=0.5, colour=Colour.BLUE, tags=["t"], weights={"w": 0.25}, inner=Inner(sizes=(3,))
    )
    path = save_resolved(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load(path.read_text())["colour"] == "blue"
    assert load_config(Outer, path) == cfg
    assert to_dict(cfg)["inner"] == {"lr": 1e-3, "sizes": [3], "pair": [1, "a"]}


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, path)


def test_planner_configs_in_the_repository_load():
    from pathlib import Path

    from models.planning.experiment import PlannerConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "planner"
    files = sorted(root.glob("*.yaml"))
    assert files, "no planner configs"
    for path in files:
        cfg = load_config(PlannerConfig, path)
        cfg.validate()
        assert cfg.env.scenario in path.stem


def test_perception_configs_in_the_repository_load_and_build():
    from pathlib import Path

    from models.experiment import load_experiment
    from models.perception import CooperativePerception

    root = Path(__file__).resolve().parents[1] / "configs" / "perception"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 10, "perception configs missing"
    for path in files:
        cfg = load_experiment(path)
        assert cfg.name == path.stem
        model = CooperativePerception(cfg.model)
        assert model.config.fusion.method in path.stem or path.stem == "tiny"


@dataclass(frozen=True)
class WithNoneWord:
    method: Literal["none", "early"] = "early"
    label: str = "x"
    limit: float | None = 1.0


def test_none_word_on_the_command_line_is_none_only_where_none_is_allowed():
    cfg = apply_overrides(WithNoneWord(), ["method=none", "label=none", "limit=none"])
    assert cfg == WithNoneWord(method="none", label="none", limit=None)
    with pytest.raises(ConfigError, match="method"):
        apply_overrides(WithNoneWord(), ["method=null"])  # not a valid literal, and None is not allowed
