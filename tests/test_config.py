"""Typed config: presets load, overrides apply, bad input fails early with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolkit.config import ConfigError, RunConfig, load_config, replace, save_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_preset_loads_and_only_holds_differences(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    defaults = RunConfig()
    raw = yaml.safe_load(path.read_text()) or {}
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(defaults, section), key) != value, f"{path.name}: {section}.{key} equals default"


def test_overrides_apply_with_yaml_types(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["qp.n_features=5", "data.train_per_class=7",
                                                       "dense.lr=0.01", "runtime.resume=true",
                                                       "qp.redundancy_threshold=null"])
    assert cfg.qp.n_features == 5 and cfg.data.train_per_class == 7
    assert cfg.dense.lr == 0.01 and cfg.runtime.resume is True and cfg.qp.redundancy_threshold is None
    assert cfg.data.dataset == "synthetic"  # untouched preset value survives


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["qp.n_per_class=4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert replace(cfg, ["qp.n_per_class=3"]).qp.n_per_class == 3


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["qp.n_featurs=50"], "qp.n_featurs", "qp.n_features"),  # typo: suggestion
        (["colour.x=1"], "colour", "Allowed keys"),  # unknown section
        (["dense.epochs=ten"], "dense.epochs", "integer"),  # wrong type
        (["dense.lr=-1"], "dense.lr", "> 0"),  # impossible value
        (["qp.n_per_class=60"], "qp.n_per_class", "qp.n_features"),  # m > k
        (["qp.solver=cplex"], "qp.solver", "'highs'"),  # closed choice lists allowed values
        (["data.image_size=100"], "data.image_size", "multiple of"),  # not a multiple of the patch size
        (["runtime.zero_stage=3"], "runtime.zero_stage", "0, 1, 2"),
        (["qp.n_features=600"], "qp.n_features", "adapter.n_features"),  # cross-section
        (["runtime.resume=yes please"], "runtime.resume", "true or false"),
        (["dense.epochs"], "dense.epochs", "key=value"),
    ],
)
def test_bad_input_names_the_key(overrides: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value) and hint in str(err.value)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
