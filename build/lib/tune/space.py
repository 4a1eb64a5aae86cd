"""Search spaces: YAML over dotted `RunConfig` keys, checked against the config before Ray starts.

A space file maps dotted keys (or nested sections) to a distribution or a fixed value:

    finetune.l1_maps: {loguniform: [0.5, 20]}
    qp.n_features: {choice: [4, 6, 8]}
    qp.n_per_class: {randint: [1, 4]}      # Ray's randint: the upper bound is excluded (1, 2 or 3)
    qp.redundancy_threshold: {choice: [null, 0.3]}
    qp:
      redundancy_weight: {uniform: [0.5, 2.0]}
    finetune.epochs: 3                      # a fixed value: applied to every trial

Distributions are Ray Tune's, with its names and arguments: uniform [a, b], quniform [a, b, q], loguniform [a, b],
randint [a, b), lograndint [a, b), choice [values], grid [values] (every value once per sample; random search only).
Keys and value types are checked by `toolkit.config` (`check_key`, `check_value`, the validator the config itself
uses): unknown keys and values of the wrong type raise `ConfigError` here, before any trial starts; values that are
impossible only against other settings (n_per_class > n_features) are allowed, because the sampled combination
may be fine: such trials fail with the reason and the sweep goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.config import ConfigError, RunConfig, check_key, check_value, load_yaml, replace

# Distribution name -> number of arguments (None: a non-empty list of values).
DISTRIBUTIONS: dict[str, int | None] = {"uniform": 2, "quniform": 3, "loguniform": 2, "randint": 2,
                                        "lograndint": 2, "choice": None, "grid": None}
_FLOAT_KINDS = ("uniform", "quniform", "loguniform")
_INT_KINDS = ("randint", "lograndint")
# Keys the sweep sets itself for every trial (each trial gets its own run directory).
RESERVED = ("runtime.output_dir", "runtime.run_name")


@dataclass(frozen=True)
class Param:
    """One swept key: `kind` names the distribution, `args` its arguments (bounds, or the values to choose from)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def to_ray(self) -> Any:
        """The Ray Tune domain (tune.uniform(...), tune.choice(...), ...)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def representatives(self) -> list[Any]:
        """Values checked against the base config: both bounds of a range, every value of a list."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind in _INT_KINDS:
            return [self.args[0], self.args[1] - 1]  # upper bound excluded, as in Ray
        return [self.args[0], self.args[1]]


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)  # key -> value applied to every trial

    @property
    def has_grid(self) -> bool:
        return any(p.kind == "grid" for p in self.params.values())

    def to_ray(self) -> dict[str, Any]:
        """Flat param_space for `tune.Tuner`, keyed by dotted config key."""
        return {k: p.to_ray() for k, p in self.params.items()}

    def fixed_overrides(self) -> list[str]:
        return [override(k, v) for k, v in self.fixed.items()]


def override(key: str, value: Any) -> str:
    """`key=value` in the YAML spelling `toolkit.config` parses back to the same value (1e-05 stays a float)."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        value = value.item()  # numpy scalars from Ray's samplers
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def overrides_of(sample: dict[str, Any]) -> list[str]:
    """Dotted overrides for one sampled trial config (keys in sorted order, so the list is reproducible)."""
    return [override(k, sample[k]) for k in sorted(sample)]


# -------------------------------------------------------------------------------------------------- parsing


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _flatten(node: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and not _is_distribution(v):
            if len(v) == 1 and key.count(".") >= 1:
                name = next(iter(v))
                raise ConfigError(f"search space key '{key}': unknown distribution '{name}'; use one of "
                                  f"{', '.join(DISTRIBUTIONS)}")
            _flatten(v, key, out)
        else:
            out[key] = v


def _param(key: str, spec: dict[str, Any]) -> Param:
    kind, args = next(iter(spec.items()))
    n = DISTRIBUTIONS[kind]
    where = f"search space key '{key}' ({kind})"
    if n is None:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: expected a non-empty list of values, got {args!r}")
        return Param(key, kind, tuple(args))
    if not isinstance(args, list) or len(args) != n:
        raise ConfigError(f"{where}: expected a list of {n} numbers, got {args!r}")
    if any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in args):
        raise ConfigError(f"{where}: bounds must be numbers, got {args!r}")
    if kind in _INT_KINDS and any(not isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: bounds must be integers, got {args!r}")
    if not args[0] < args[1]:
        raise ConfigError(f"{where}: the lower bound must be below the upper one, got {args!r}")
    if kind.startswith("log") and args[0] <= 0:
        raise ConfigError(f"{where}: log-scale bounds must be > 0, got {args!r}")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"{where}: the step q must be > 0, got {args!r}")
    return Param(key, kind, tuple(args))


def parse_space(mapping: dict[str, Any]) -> SearchSpace:
    """A `SearchSpace` from a mapping of dotted keys (or nested sections) to distributions or fixed values."""
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"a search space must be a non-empty mapping of config keys, got {mapping!r}")
    flat: dict[str, Any] = {}
    _flatten(mapping, "", flat)
    params = {k: _param(k, v) for k, v in flat.items() if _is_distribution(v)}
    fixed = {k: v for k, v in flat.items() if not _is_distribution(v)}
    if not params:
        raise ConfigError("the search space has no distribution ({uniform: [a, b]}, {choice: [...]}, ...); "
                          "nothing to sweep")
    return SearchSpace(params=params, fixed=fixed)


def load_space(path: str | Path) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"search space {p} not found; spaces live in tune/spaces/ (e.g. default.yaml)")
    return parse_space(load_yaml(p))  # the config's YAML reading: 1e-3 is a float, syntax errors name the line


# ----------------------------------------------------------------------------------------------- validation


def _fits(key: str, value: Any) -> bool:
    """Whether `key` can hold `value` by type (its bounds are checked later, against the base config)."""
    try:
        check_value(key, value, constraints=False)
    except ConfigError:
        return False
    return True


def validate_space(space: SearchSpace, base: RunConfig) -> list[str]:
    """Check every key and value type against `RunConfig`; returns warnings for values impossible on their own.

    Raises:
        ConfigError: an unknown or reserved key, or a distribution whose values the key cannot hold.
    """
    for key in [*space.params, *space.fixed]:
        if key in RESERVED:
            raise ConfigError(f"search space key '{key}' is set by the sweep itself (one run directory per trial); "
                              "set the sweep's --output instead")
        try:
            check_key(key)
        except ConfigError as e:
            raise ConfigError(f"search space: {e}", key=key) from None
    for key, value in space.fixed.items():
        if not _fits(key, value):
            raise ConfigError(f"search space key '{key}': fixed value {value!r} does not fit the config type")
    for key, p in space.params.items():
        if p.kind in _FLOAT_KINDS and not _fits(key, 0.5):
            raise ConfigError(f"search space key '{key}': {p.kind} draws real numbers but the key takes "
                              f"{'integers (use randint or lograndint)' if _fits(key, 1) else 'no numbers'}")
        if p.kind in _INT_KINDS and not _fits(key, 1):
            raise ConfigError(f"search space key '{key}': {p.kind} draws integers but the key takes no numbers")
        bad = [v for v in p.args if p.kind in ("choice", "grid") and not _fits(key, v)]
        if bad:
            raise ConfigError(f"search space key '{key}': value(s) {bad!r} do not fit the config type")
    fixed_base = replace(base, space.fixed_overrides()) if space.fixed else base
    warnings = []
    for key, p in space.params.items():
        for value in p.representatives():
            try:
                replace(fixed_base, [override(key, value)])
            except ConfigError as e:
                warnings.append(f"{key}={value!r} is impossible with the base config ({e}); trials that draw it "
                                "without a compensating value fail with this reason")
    return warnings
