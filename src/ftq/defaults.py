"""What each setting of params.yaml is and where its value comes from, for `ftq params`.

Each block's defaults live in its stage's module (the value a key left out of params.yaml takes);
this module only finds those tables. tests/test_params.py holds every table equal to params.yaml."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import yaml

from ftq.params import ParamsError, flatten


def _train() -> dict:
    from ftq.training.settings import TrainSettings

    return dataclasses.asdict(TrainSettings())


def _data() -> dict:
    from ftq.stages.prepare import DEFAULTS

    return DEFAULTS


def _evaluate() -> dict:
    from ftq.evaluation.harness import DEFAULTS as LM_EVAL
    from ftq.stages.evaluate import DEFAULTS, MT_BENCH_DEFAULTS

    return {**DEFAULTS, "lm_eval": LM_EVAL, "mt_bench": MT_BENCH_DEFAULTS}


def _quantize() -> dict:
    from ftq.stages.quantize import CALIBRATION_DEFAULTS, CHECK_DEFAULTS
    from ftq.stages.reference import DEFAULTS as REFERENCE

    return {"check": CHECK_DEFAULTS, "calibration": CALIBRATION_DEFAULTS, "reference": REFERENCE}


def _promote() -> dict:
    from ftq.stages.promote import DEFAULT_POLICY

    return {"policy": DEFAULT_POLICY}


TABLES: dict[str, Callable[[], dict]] = {"data": _data, "train": _train, "quantize": _quantize,
                                         "evaluate": _evaluate, "promote": _promote}


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """`-S key=value` as DVC reads it: the value is YAML (1e-3, true, [a, b])."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ParamsError(f"-S {assignment!r}: expected <block>.<key>=<value>")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as text; DVC (YAML 1.2) as a number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key.strip()] = parsed
    return overrides


def effective(params: dict[str, Any], overrides: dict[str, Any], blocks: list[str] | None = None) -> list[tuple[str, Any, str]]:
    """(dotted key, value, source) for every setting of the blocks: source is `-S` (an override),
    `params.yaml`, or `default` (left out of params.yaml: the stage's own default)."""
    names = blocks or [b for b in params if not b.startswith("_")]
    unknown = [b for b in names if b not in params and b not in TABLES]
    if unknown:
        raise ParamsError(f"{params.get('_path', 'params.yaml')}: no block {unknown[0]!r} "
                          f"(blocks: {', '.join(b for b in params if not b.startswith('_'))})")
    rows = []
    for name in names:
        given = flatten(params.get(name) or {}, f"{name}.", lists_as_json=False)
        defaults = flatten(TABLES[name](), f"{name}.", lists_as_json=False) if name in TABLES else {}
        for key in sorted(k for k in overrides if k.startswith(f"{name}.")):
            if key not in given and key not in defaults and not any(key.startswith(g + ".") for g in given):
                raise ParamsError(f"-S {key}: {params.get('_path', 'params.yaml')} has no such setting")
        for key in sorted(set(given) | set(defaults) | {k for k in overrides if k.startswith(f"{name}.")}):
            if key in overrides:
                rows.append((key, overrides[key], "-S"))
            elif key in given:
                rows.append((key, given[key], "params.yaml"))
            else:
                rows.append((key, defaults[key], "default"))
    return rows


def render(rows: list[tuple[str, Any, str]]) -> str:
    width = max((len(k) for k, _, _ in rows), default=10)
    lines = []
    for key, value, source in rows:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()
        lines.append(f"{key:<{width}}  {text}  ({source})")
    return "\n".join(lines)
