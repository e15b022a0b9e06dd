"""Errors in user data, each naming the file, the record (numbered from 0, as in `data[17]`) and the field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RecordError(Exception):
    file: str
    record: int | None
    field: str | None
    message: str
    reason: str  # a short category for counting: missing_field, empty_field, unknown_role, ...
    line: int | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.record is not None:
            where.append(f"record {self.record}" + (f" (line {self.line})" if self.line else ""))
        if self.field:
            where.append(f"field '{self.field}'")
        return ": ".join(where) + f": {self.message}"

    def as_json(self) -> dict:
        return {
            "file": self.file,
            "record": self.record,
            "line": self.line,
            "field": self.field,
            "reason": self.reason,
            "message": self.message,
        }


class DataError(ValueError):
    """Data that cannot be used: a whole-file problem, or record errors under `on_error: fail`."""

    def __init__(self, message: str, errors: list[RecordError] | None = None):
        super().__init__(message)
        self.errors = errors or []
