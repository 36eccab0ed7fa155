"""Layered configuration: an experiment's ``Config`` defaults -> its suite -> ``--set`` overrides.

``--set`` keys are ``experiment.field=value`` (one experiment) or ``field=value`` (every selected
experiment that has the field). Values parse by the field's type: ``int``, ``float``, ``bool``
(true/false/1/0), ``str``, or tuples of those written comma-separated (``e1.batch_sizes=1,4,128``).
Unknown suites, experiments and keys are errors that list the valid ones, and so are names that
an experiment does not know in its string fields (its ``CHOICES``). A tuple may be empty only
where the experiment says that means something (its ``MAY_BE_EMPTY``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

SUITES = ("smoke", "quick", "full")
DEFAULT_SEEDS = {"smoke": 1, "quick": 3, "full": 5}


def check_suite(suite: str) -> str:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    return suite


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_scalar(text: str, typ, key: str):
    text = text.strip()
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}: expected a bool (true/false), got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--set {key}: expected {typ.__name__}, got {text!r}") from None


def parse_value(text: str, typ, key: str, may_be_empty: bool = False):
    """``text`` as a value of type ``typ``; an empty tuple only where ``may_be_empty``."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        elem = args[0] if args else str
        value = tuple(_parse_scalar(t, elem, key) for t in text.split(",") if t.strip())
        if not value and not may_be_empty:
            raise ValueError(f"--set {key}: expected one or more comma-separated values, got {text!r}")
        return value
    return _parse_scalar(text, typ, key)


def coerce(cls, data: dict):
    """Rebuild a config dataclass from JSON (lists back to tuples); unknown keys are errors."""
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid: {', '.join(types)}")
    out = {}
    for k, v in data.items():
        out[k] = tuple(v) if typing.get_origin(types[k]) is tuple else v
    return cls(**out)


def parse_sets(sets: list[str] | None, modules: dict) -> dict[str, dict[str, str]]:
    """Split ``--set`` items into ``{experiment: {field: raw value}}`` for the selected modules."""
    per_exp: dict[str, dict[str, str]] = {name: {} for name in modules}
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if "." in key:
            exp, field = key.split(".", 1)
            if exp not in modules:
                raise ValueError(f"--set {key}: experiment {exp!r} is not selected; selected: {', '.join(modules)}")
            valid = list(_field_types(modules[exp].Config))
            if field not in valid:
                raise ValueError(f"--set {key}: unknown key {field!r} for {exp}; valid: {', '.join(valid)}")
            per_exp[exp][field] = value
        else:
            hit = [n for n, m in modules.items() if key in _field_types(m.Config)]
            if not hit:
                valid = sorted({f"{n}.{f}" for n, m in modules.items() for f in _field_types(m.Config)})
                raise ValueError(f"--set {key}: no selected experiment has this key; valid: {', '.join(valid)}")
            for n in hit:
                per_exp[n][key] = value
    return per_exp


def resolve(module, suite: str, raw_sets: dict[str, str] | None = None, name: str | None = None):
    """The experiment's config for ``suite`` with ``--set`` values applied, checked.

    ``name``: the experiment's name, which error messages put before the field (``e1.norms``)."""
    check_suite(suite)
    cfg = module.Config()
    cfg = dataclasses.replace(cfg, **module.SUITES.get(suite, {}))
    types = _field_types(module.Config)
    empty_ok = set(getattr(module, "MAY_BE_EMPTY", ()))
    label = (lambda k: f"{name}.{k}") if name else (lambda k: k)  # noqa: E731
    parsed = {k: parse_value(v, types[k], label(k), k in empty_ok) for k, v in (raw_sets or {}).items()}
    for k, v in parsed.items():
        check_range(k, v, label(k))
    cfg = dataclasses.replace(cfg, **parsed)
    check_choices(module, cfg, label)
    return cfg


def check_choices(module, cfg, label=lambda k: k) -> None:
    """Every name in a string field of ``cfg`` is one the experiment knows (``module.CHOICES``:
    ``{field: valid names}``)."""
    for field, valid in getattr(module, "CHOICES", {}).items():
        value = getattr(cfg, field)
        for v in value if isinstance(value, tuple) else (value,):
            if v not in valid:
                raise ValueError(f"--set {label(field)}: unknown name {v!r}; valid: {', '.join(valid)}")


# Fields where 0 means "none" or "all" (see their comments in the experiments' Config).
ZERO_ALLOWED = frozenset({"max_steps", "seq_embed", "warmups", "train_images", "eval_images",
                          "margin", "within", "grad_tol"})


def check_range(key: str, value, label: str | None = None) -> None:
    """Sizes, step counts and rates are > 0 (>= 0 where 0 has a meaning) and finite.

    ``key``: the field; ``label``: how messages name it (default the field)."""
    label = label or key
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ValueError(f"--set {label}: expected a finite number, got {v!r}")
        if v < 0 or (v == 0 and key not in ZERO_ALLOWED):
            raise ValueError(f"--set {label}: expected a number {'>= 0' if key in ZERO_ALLOWED else '> 0'}, got {v!r}")
