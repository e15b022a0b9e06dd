"""Task accuracy on the project's held-out conversations: the candidate answers each prompt (all turns
before the last assistant turn) and is scored against that turn. The metric fits the answer:
JSON validity and per-field accuracy where the reference is a JSON object, exact match always,
ROUGE-L F1 for free text. Every mean comes with `<metric>_ci95`, its 95 % interval over the examples
(ftq.evidence.mean_interval: exact for 0/1 scores), and `<metric>_examples`, the examples it was scored on:
a few dozen examples decide little, and a JSON metric counts only the JSON references.

A conversation with tools is asked for its first function-call turn (or its last answer when it makes
no call), rendered as prepare rendered it for training. Calls are scored like BFCL's AST match: the
answer's calls are parsed, and `tool_call_name_accuracy` asks for the same function names,
`tool_call_exact` for the same names with arguments equal as JSON values (parallel calls in any order).
Where tools are offered but the answer needs none, `tool_call_abstained` asks for no call (BFCL's
irrelevance check)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ftq import evidence
from ftq.data import tools


def load_examples(path: Path, limit: int, rendering: str = tools.FALLBACK) -> list[dict]:
    """`limit` conversations spread evenly over the file (held-out sets are often grouped by kind), or all.
    `rendering` is how prepare rendered tools (data/processed/manifest.json `tool_rendering`)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if 0 < limit < len(lines):
        lines = [lines[i * len(lines) // limit] for i in range(limit)]
    examples = []
    for line in lines:
        record = json.loads(line)
        messages = record["messages"]
        calls = [i for i, m in enumerate(messages) if m.get("tool_calls")]
        asked = calls[0] if calls else max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt, shown_tools = tools.for_template(messages[:asked], record.get("tools") or None, rendering)
        example = {"id": f"{record.get('dataset', '')}#{record.get('record', len(examples))}", "prompt": prompt,
                   "tools": shown_tools, "reference": messages[asked]["content"]}
        if record.get("tools") and not calls:
            example["reference_calls"] = []  # tools offered, none needed: a call here is wrong
        if calls:
            reference_calls = messages[asked]["tool_calls"]
            example["reference"] = tools.call_text(reference_calls)
            example["reference_calls"] = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                          for c in reference_calls]
        examples.append(example)
    return examples


def score_calls(prediction: str, expected: list[dict]) -> dict:
    _text, got = tools.parse_calls(prediction)
    names = sorted(c["name"] for c in got) == sorted(c["name"] for c in expected)
    unmatched = list(got)
    for call in expected:  # == on parsed JSON: 12 equals 12.0, key order does not matter
        match = next((c for c in unmatched if c["name"] == call["name"] and c["arguments"] == call["arguments"]), None)
        if match is None:
            break
        unmatched.remove(match)
    else:
        return {"tool_call_name_accuracy": float(names), "tool_call_exact": float(not unmatched)}
    return {"tool_call_name_accuracy": float(names), "tool_call_exact": 0.0}


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower().strip(".!"))


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_json_object(text: str):
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score(prediction: str, reference: str, reference_calls: list[dict] | None = None) -> dict:
    result = {"exact_match": float(normalize(prediction) == normalize(reference)),
              "rouge_l": rouge_l(prediction, reference)}
    if reference_calls == []:
        return {**result, "tool_call_abstained": float(not tools.parse_calls(prediction)[1])}
    if reference_calls is not None:
        return {**result, **score_calls(prediction, reference_calls)}
    expected = parse_json_object(reference)
    if expected is not None:
        got = parse_json_object(prediction)
        result["json_valid"] = float(got is not None)
        result["json_field_accuracy"] = (
            sum(1 for k, v in expected.items() if got is not None and got.get(k) == v) / len(expected) if expected else 1.0
        )
    return result


def aggregate(rows: list[dict]) -> dict:
    metrics: dict = {}
    for key in ("exact_match", "rouge_l", "json_valid", "json_field_accuracy", "tool_call_name_accuracy",
                "tool_call_exact", "tool_call_abstained"):
        values = [r[key] for r in rows if key in r]
        if values:
            summary = evidence.mean_interval(values)
            metrics[key] = summary["mean"]
            metrics[f"{key}_ci95"] = summary["interval"]
            metrics[f"{key}_examples"] = len(values)  # the examples this metric was scored on
    metrics["examples"] = len(rows)
    metrics["json_examples"] = sum(1 for r in rows if "json_valid" in r)
    if any("tool_call_exact" in r for r in rows):
        metrics["tool_call_examples"] = sum(1 for r in rows if "tool_call_exact" in r)
    return metrics
