import dataclasses

import pytest

from chameleon_jax import configlib
from chameleon_jax.config import MODEL_PRESETS, MeshConfig, ModelConfig
from chameleon_jax.configlib import ConfigError, param


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = param(1e-3, "learning rate")
    sizes: tuple[int, ...] = param((1, 2), "sizes")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = param("x", "a name")
    steps: int = param(10, "steps")
    flag: bool = param(False, "a flag")
    inner: Inner = param(Inner(), "nested section")


def test_nested_override_parses_types():
    cfg = configlib.apply_overrides(Outer(), ["inner.lr=0.5", "steps=3", "flag=true", "inner.sizes=4,5,6"])
    assert cfg.inner.lr == 0.5 and cfg.steps == 3 and cfg.flag is True and cfg.inner.sizes == (4, 5, 6)


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="inner.lrr"):
        configlib.apply_overrides(Outer(), ["inner.lrr=1"])
    with pytest.raises(ConfigError, match="nope"):
        configlib.apply_overrides(Outer(), ["nope=1"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="steps.*integer"):
        configlib.apply_overrides(Outer(), ["steps=ten"])
    with pytest.raises(ConfigError, match="model.qk_norm"):
        configlib.override(dataclasses.replace(Holder()), "model.qk_norm", "sometimes")


@dataclasses.dataclass(frozen=True)
class Holder:
    model: ModelConfig = param(ModelConfig(), "model")


def test_save_load_round_trip(tmp_path):
    cfg = configlib.apply_overrides(Outer(), ["inner.lr=0.25"])
    configlib.save(cfg, tmp_path / "config.json")
    assert configlib.load(Outer, tmp_path / "config.json") == cfg


def test_load_rejects_unknown_keys(tmp_path):
    (tmp_path / "c.json").write_text('{"steps": 1, "bogus": 2}')
    with pytest.raises(ConfigError, match="bogus"):
        configlib.load(Outer, tmp_path / "c.json")


def test_cli_presets_and_unknown_preset():
    presets = {"a": Outer, "b": lambda: Outer(steps=99)}
    assert configlib.from_cli(["preset=b", "name=z"], presets, "a") == Outer(name="z", steps=99)
    with pytest.raises(ConfigError, match="unknown preset"):
        configlib.from_cli(["preset=c"], presets, "a")


def test_every_field_is_described():
    for cfg in [Outer(), MeshConfig(), *[p() for p in MODEL_PRESETS.values()]]:
        for line in configlib.describe(cfg):
            assert line.split("#", 1)[1].strip(), line


def test_released_7b_ffn_width():
    assert MODEL_PRESETS["chameleon-7b"]().ffn_dim == 11008
