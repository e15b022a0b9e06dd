"""`ftq params`: the effective value of every setting of a block and where it came from (a `-S`
override, params.yaml, or the default in ftq.schema), validated the way the stages validate it; with
--explain, what each setting does and accepts."""

from __future__ import annotations

import copy
import textwrap
from typing import Any

import yaml

from ftq import schema
from ftq.params import ParamsError, flatten


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
    `params.yaml`, or `default` (left out of params.yaml: the schema's default). The blocks, with the
    overrides applied, must pass the stages' validator (an unknown or invalid -S setting is an error)."""
    path = params.get("_path", "params.yaml")
    names = blocks or [b for b in params if not b.startswith("_")]
    unknown = [b for b in names if b not in schema.SCHEMA]
    if unknown:
        raise ParamsError(f"{path}: no block {unknown[0]!r} (blocks: {', '.join(schema.SCHEMA)})")
    changed = copy.deepcopy(params)
    for key, value in overrides.items():
        _assign(changed, key, value, path)
    for name in {key.split(".")[0] for key in overrides} - set(names):
        schema.settings(changed, name)  # an override outside the blocks shown is still validated
    rows = []
    for name in names:
        given = flatten(params.get(name) or {}, f"{name}.", lists_as_json=False)
        for key, value in flatten(schema.settings(changed, name), f"{name}.", lists_as_json=False).items():
            source = "-S" if key in overrides or any(key.startswith(o + ".") for o in overrides) else \
                "params.yaml" if key in given else "default"
            rows.append((key, value, source))
    return rows


def _assign(params: dict[str, Any], dotted: str, value: Any, path: str) -> None:
    *parents, last = dotted.split(".")
    if not parents or parents[0] not in schema.SCHEMA:
        raise ParamsError(f"-S {dotted}: {path} has no such setting (blocks: {', '.join(schema.SCHEMA)})")
    node = params
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else None
        if node is None:
            raise ParamsError(f"-S {dotted}: {path} has no such setting ({key} is not a block of settings)")
    node[last] = value


def render(rows: list[tuple[str, Any, str]]) -> str:
    width = max((len(k) for k, _, _ in rows), default=10)
    return "\n".join(f"{key:<{width}}  {_text(value)}  ({source})" for key, value, source in rows)


def explain(sections: list[str] | None = None) -> str:
    """`ftq params --explain`: each setting's key, default and accepted values, then what it does, from
    ftq.schema alone (no params.yaml needed). A section is a block or any dotted prefix (train.lora)."""
    rows = schema.leaves()
    if sections:
        rows = [(key, s) for key, s in rows if any(key == p or key.startswith(p + ".") for p in sections)]
        if not rows:
            raise ParamsError(f"--explain {' '.join(sections)}: no such setting (blocks: {', '.join(schema.SCHEMA)})")
    lines = []
    for key, setting in rows:
        lines.append(f"{key}: {'(required)' if setting.required else _text(setting.default)}")
        lines += textwrap.wrap(f"accepts {setting.expect}", 100, initial_indent="    ", subsequent_indent="      ")
        lines += textwrap.wrap(setting.explained(), 100, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)  # a link stays whole
    return "\n".join(lines)


def _text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()
