"""Validate one file against its format: every record normalized or rejected with a named error,
exact duplicates counted. Used by `ftq data check` and by the prepare stage, so both report the same."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftq.data.errors import RecordError
from ftq.data import preference
from ftq.data.formats import FormatSpec, normalize
from ftq.data.readers import read_records


@dataclass
class FileCheck:
    file: str
    records: int = 0
    conversations: list[dict[str, Any]] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    duplicates: int = 0

    @property
    def rejects_by_reason(self) -> dict[str, int]:
        return dict(Counter(e.reason for e in self.errors))

    def summary(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "records": self.records,
            "valid": len(self.conversations),
            "rejected": len(self.errors),
            "duplicates": self.duplicates,
            "rejects_by_reason": self.rejects_by_reason,
        }


def conversation_key(conversation: dict[str, Any]) -> str:
    if "messages" not in conversation:  # a preference record: the whole of it
        return json.dumps(conversation, sort_keys=True, ensure_ascii=False)
    return json.dumps([conversation["messages"], conversation.get("tools")], sort_keys=True, ensure_ascii=False)


def check_file(path: str | Path, spec: FormatSpec, seen: set[str] | None = None) -> FileCheck:
    """Read and normalize every record. Duplicates (against `seen`, shared across files) are dropped."""
    result = FileCheck(str(path))
    seen = set() if seen is None else seen
    parse = preference.normalize if preference.kind(spec) else normalize
    for index, record in read_records(path):
        result.records += 1
        if isinstance(record, RecordError):
            result.errors.append(record)
            continue
        try:
            conversation = parse(record, spec, str(path), index)
        except RecordError as error:
            result.errors.append(error)
            continue
        key = conversation_key(conversation)
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        conversation["record"] = index
        result.conversations.append(conversation)
    return result
