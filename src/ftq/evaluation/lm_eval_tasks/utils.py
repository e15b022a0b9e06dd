"""Documents for ftq's own lm-eval tasks, built from the project's local files.

lm-eval calls these through `custom_dataset` with the TaskManager's metadata as keyword arguments:
  ftq_root     the project root (default: the current directory)
  ftq_heldout  the held-out conversations (default: data/processed/eval.jsonl, else train.jsonl)
  ftq_text     the plain text for perplexity (default: general_text.txt beside this file)
so the tasks also run from the lm-eval CLI in a project folder:
  lm_eval --model hf --model_args pretrained=models/merged --device cpu --include_path <this folder> \
    --tasks ftq --apply_chat_template
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _root(kwargs) -> Path:
    return Path(kwargs.get("ftq_root") or ".")


def _heldout_file(kwargs) -> Path:
    if kwargs.get("ftq_heldout"):
        path = Path(kwargs["ftq_heldout"])
        return path if path.is_absolute() else _root(kwargs) / path
    processed = _root(kwargs) / "data" / "processed"
    held_out = processed / "eval.jsonl"
    return held_out if held_out.exists() and held_out.read_text().strip() else processed / "train.jsonl"


def single_turn(kwargs) -> list[dict]:
    """(question, answer) pairs: conversations with one user turn and a final assistant answer; a system
    prompt is folded into the question, since lm-eval's chat formatting has one user message per doc.
    Conversations with tools are left to ftq's own task scoring: lm-eval's formatting cannot show tools."""
    path = _heldout_file(kwargs)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no held-out conversations (run `dvc repro prepare`)")
    pairs = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("tools"):
            continue
        messages = record.get("messages") or []
        users = [m for m in messages if m["role"] == "user"]
        if len(users) != 1 or not messages or messages[-1]["role"] != "assistant":
            continue
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        question = f"{system}\n\n{users[0]['content']}" if system else users[0]["content"]
        pairs.append({"record": line_number - 1, "question": question, "answer": messages[-1]["content"]})
    if not pairs:
        raise ValueError(f"{path}: no single-turn conversations ending in an assistant answer to evaluate")
    return pairs


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def heldout_generate(**kwargs):
    return _dataset(single_turn(kwargs))


def text_documents(**kwargs):
    """One document per paragraph (blank-line separated) of a local plain-text file."""
    path = Path(kwargs.get("ftq_text") or HERE / "general_text.txt")
    if not path.is_absolute() and kwargs.get("ftq_text"):
        path = _root(kwargs) / path
    if not path.exists():
        raise FileNotFoundError(f"{path}: perplexity text not found (evaluate.lm_eval.text)")
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"{path}: no text")
    return _dataset([{"text": p} for p in paragraphs])
