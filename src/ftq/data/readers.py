"""Read records from json, jsonl, csv or parquet files, one dict (or a RecordError) per record."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from ftq.data.errors import DataError, RecordError

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def file_type(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (expected {', '.join(SUFFIXES)})")
    return kind


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    kind = file_type(path)
    yield from {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind](path)


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    yield from enumerate(data)


def _read_jsonl(path: Path):
    index = 0
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as exc:
                yield index, RecordError(str(path), index, None, f"invalid JSON: {exc.msg}", "invalid_json", line_no)
            index += 1


def _decode_json_cell(value: Any) -> Any:
    """CSV cells are strings; list-valued fields (history, conversations) are stored as JSON text."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: Path):
    with open(path, encoding="utf-8", newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            yield index, {k: _decode_json_cell(v) for k, v in row.items() if k is not None}


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: unreadable parquet file: {exc}") from exc
    yield from enumerate(table.to_pylist())
