"""Stage `prepare`: validate, normalize, deduplicate, sample, split and tokenize the datasets named in
params.yaml `data.datasets` (from the registry `data.registry`).

Outputs (written to a temp folder, renamed into place):
  data/processed/{train,eval}.jsonl   normalized conversations with their dataset and record index
  data/processed/{train,eval}/        tokenized (input_ids, labels) as Hugging Face datasets
  data/processed/manifest.json        counts, settings and an md5 over the other files
  reports/data.json                   records in/out per dataset, rejects by reason, length percentiles
  reports/data_lengths.png            token-length histogram
  reports/data_rejects.jsonl          every rejected record with its reason (on_error: skip)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftq.data import preference
from ftq.data.check import FileCheck, check_file
from ftq.data.errors import DataError, RecordError
from ftq.data.registry import DatasetSpec, load_registry, sample, select
from ftq.data.tokenize import tokenize_conversation, tool_rendering
from ftq.io import atomic_dir, atomic_write_json, atomic_write_text, save_figure, tree_md5
from ftq import schema
from ftq.params import ParamsError, repo_root
from ftq.provenance import stamp

log = logging.getLogger(__name__)

OUTPUT_DIR = Path("data/processed")
REPORT = Path("reports/data.json")
HISTOGRAM = Path("reports/data_lengths.png")
REJECTS = Path("reports/data_rejects.jsonl")
MAX_ERRORS_SHOWN = 20


@dataclass
class PrepareSettings:
    registry: Path
    datasets: list[str]
    eval_size: float
    seed: int
    max_length: int
    truncation: str
    on_error: str

    @classmethod
    def from_params(cls, params: dict[str, Any], root: Path) -> "PrepareSettings":
        cfg = schema.settings(params, "data")
        names = cfg["datasets"]
        if not names:
            raise ParamsError(f"{params.get('_path', 'params.yaml')}: data.datasets: expected a list of dataset "
                              "names from the registry")
        return cls(registry=root / cfg["registry"], datasets=names, eval_size=cfg["eval_size"], seed=cfg["seed"],
                   max_length=cfg["max_length"], truncation=cfg["truncation"], on_error=cfg["on_error"])


@dataclass
class PrepareResult:
    output_dir: Path
    report: dict[str, Any]


def validate(specs: list[DatasetSpec], on_error: str) -> dict[str, FileCheck]:
    """Check every file; under `fail` any rejected record stops the stage with all errors listed."""
    seen: set[str] = set()
    checks = {spec.name: check_file(spec.file, spec.format, seen) for spec in specs}
    errors = [e for c in checks.values() for e in c.errors]
    if errors and on_error == "fail":
        shown = "\n".join(f"  {e}" for e in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DataError(
            f"{len(errors)} invalid record(s) (data.on_error: fail; set it to skip to drop them):\n{shown}{more}",
            errors,
        )
    return checks


def split(specs: list[DatasetSpec], pools: dict[str, list[dict]], eval_size: float, rng: random.Random):
    train, evaluation, auto = [], [], []
    for spec in specs:
        {"train": train, "eval": evaluation, "auto": auto}[spec.split].extend(pools[spec.name])
    rng.shuffle(auto)
    count = int(round(eval_size * len(auto))) if eval_size < 1 else int(eval_size)
    count = min(count, max(len(auto) - 1, 0))
    evaluation += auto[:count]
    train += auto[count:]
    rng.shuffle(train)
    return train, evaluation


def tokenize_all(tokenizer, conversations: list[dict], settings: PrepareSettings, rendering: str,
                 files: dict[str, str] | None = None):
    """Token rows, the conversations kept, and counts. An example with tools whose tokens no longer show
    one of them (a template that drops tools, or truncation) fails the stage: training on it would teach
    calls to functions the model was never shown."""
    rows = {"input_ids": [], "labels": [], "length": []}
    stats = {"truncated": 0, "dropped_too_long": 0, "with_tools": 0}
    kept, lost = [], []
    for conversation in conversations:
        example = tokenize_conversation(tokenizer, conversation, settings.max_length, settings.truncation, rendering)
        if example is None:
            stats["dropped_too_long"] += 1
            continue
        if example.missing_tools:
            lost.append(RecordError((files or {}).get(conversation["dataset"], conversation["dataset"]),
                                    conversation.get("record"),
                                    "tools", f"the tokenized example does not show tool(s) "
                                    f"{', '.join(example.missing_tools)} ({rendering} rendering, "
                                    f"{len(example.input_ids)} tokens kept of max_length {settings.max_length})",
                                    "tools_lost"))
            continue
        stats["with_tools"] += bool(conversation.get("tools"))
        stats["truncated"] += example.truncated
        rows["input_ids"].append(example.input_ids)
        rows["labels"].append(example.labels)
        rows["length"].append(len(example.input_ids))
        kept.append(conversation)
    if lost:
        shown = "\n".join(f"  {e}" for e in lost[:MAX_ERRORS_SHOWN])
        raise DataError(f"{len(lost)} example(s) lost their tools in tokenization:\n{shown}", lost)
    return rows, kept, stats


def length_stats(rows: dict[str, list], max_length: int) -> dict[str, Any]:
    import numpy as np

    lengths = np.array(rows["length"] or [0])
    targets = sum(sum(1 for x in labels if x != -100) for labels in rows["labels"])
    return {
        "examples": len(rows["length"]),
        "tokens": int(lengths.sum()) if rows["length"] else 0,
        "target_tokens": targets,
        "length": {
            "mean": round(float(lengths.mean()), 1),
            "p50": int(np.percentile(lengths, 50)),
            "p90": int(np.percentile(lengths, 90)),
            "p95": int(np.percentile(lengths, 95)),
            "p99": int(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
        },
        # share of a padded batch that is real tokens if every row were max_length wide
        "fill_at_max_length": round(float(lengths.sum()) / (len(lengths) * max_length), 4) if rows["length"] else 0,
    }


def plot_lengths(train_lengths: list[int], eval_lengths: list[int], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    bins = min(50, max(10, max_length // 16))
    ax.hist(train_lengths, bins=bins, range=(0, max_length), alpha=0.7, label=f"train ({len(train_lengths)})")
    if eval_lengths:
        ax.hist(eval_lengths, bins=bins, range=(0, max_length), alpha=0.7, label=f"eval ({len(eval_lengths)})")
    ax.axvline(max_length, color="black", linestyle="--", linewidth=1, label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run(params: dict[str, Any]) -> PrepareResult:
    import datasets
    from datasets import Dataset
    from transformers import AutoTokenizer
    from ftq.hf import load_kwargs

    datasets.disable_progress_bars()

    from ftq.tracking import stage_run

    root = repo_root()
    settings = PrepareSettings.from_params(params, root)
    with stage_run("prepare", params, block_name="data") as tracked:
        specs = select(load_registry(settings.registry), settings.datasets, settings.registry)
        for spec in specs:
            if preference.kind(spec.format):
                raise ParamsError(f"{settings.registry}: dataset '{spec.name}' holds preference records "
                                  "(`ranking: true` or columns.kto_tag), and data.datasets are supervised "
                                  "conversations for SFT: remove it from data.datasets")
        checks = validate(specs, settings.on_error)
        rng = random.Random(settings.seed)
        pools = {}
        for spec in specs:
            for conversation in checks[spec.name].conversations:
                conversation["dataset"] = spec.name
            pools[spec.name] = sample(checks[spec.name].conversations, spec.num_samples, rng)
        train, evaluation = split(specs, pools, settings.eval_size, rng)
        if not train:
            raise DataError("no training records left after validation and the split (see reports/data.json)")

        base_dir = root / "models" / "base"
        tokenizer = AutoTokenizer.from_pretrained(base_dir, **load_kwargs())
        rendering = tool_rendering(tokenizer)
        files = {spec.name: _display_path(spec.file) for spec in specs}
        train_rows, train, train_stats = tokenize_all(tokenizer, train, settings, rendering, files)
        eval_rows, evaluation, eval_stats = tokenize_all(tokenizer, evaluation, settings, rendering, files)

        out_dir = root / OUTPUT_DIR
        with atomic_dir(out_dir) as tmp:
            write_jsonl(tmp / "train.jsonl", train)
            write_jsonl(tmp / "eval.jsonl", evaluation)
            Dataset.from_dict(train_rows).save_to_disk(str(tmp / "train"))
            if eval_rows["input_ids"]:  # datasets cannot load an empty saved dataset back
                Dataset.from_dict(eval_rows).save_to_disk(str(tmp / "eval"))
            manifest = {
                "md5": tree_md5(tmp),
                "train_examples": len(train),
                "eval_examples": len(evaluation),
                "max_length": settings.max_length,
                "truncation": settings.truncation,
                "datasets": settings.datasets,
                "chat_template_md5": _md5(tokenizer.chat_template or ""),
            }
            if train_stats["with_tools"] or eval_stats["with_tools"]:  # what evaluate renders tools with
                manifest["tool_rendering"] = rendering
            atomic_write_json(tmp / "manifest.json", manifest)

        rejects = [e for c in checks.values() for e in c.errors]
        atomic_write_text(root / REJECTS, "".join(json.dumps(e.as_json()) + "\n" for e in rejects))
        report = build_report(specs, checks, pools, train, evaluation, train_rows, eval_rows, settings)
        report["train"].update(train_stats)
        report["eval"].update(eval_stats)
        report["tool_rendering"] = rendering
        report = stamp(report)
        atomic_write_json(root / REPORT, report)
        plot_lengths(train_rows["length"], eval_rows["length"], settings.max_length, root / HISTOGRAM)

        tracked.log_metrics(metrics_of(report))
        tracked.log_artifact(root / REPORT)
        tracked.log_artifact(root / HISTOGRAM)
        if rejects:
            tracked.log_artifact(root / REJECTS)
        tracked.set_tags({"data.md5": manifest["md5"], "data.tool_rendering": rendering})
    log.info("prepared %d train / %d eval examples into %s", len(train), len(evaluation), out_dir)
    return PrepareResult(out_dir, report)


def _display_path(path: Path) -> str:
    """Relative to the project when inside it, so reports do not depend on where the clone lives."""
    try:
        return path.resolve().relative_to(repo_root()).as_posix()
    except ValueError:
        return str(path)


def _md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode()).hexdigest()


def build_report(specs, checks, pools, train, evaluation, train_rows, eval_rows, settings) -> dict[str, Any]:
    per_dataset = {}
    for spec in specs:
        summary = checks[spec.name].summary()
        summary["file"] = _display_path(spec.file)
        summary.update(
            format=spec.format.format,
            split=spec.split,
            sampled=len(pools[spec.name]),
            train=sum(1 for c in train if c["dataset"] == spec.name),
            eval=sum(1 for c in evaluation if c["dataset"] == spec.name),
        )
        per_dataset[spec.name] = summary
    rejects: dict[str, int] = {}
    for check in checks.values():
        for reason, count in check.rejects_by_reason.items():
            rejects[reason] = rejects.get(reason, 0) + count
    return {
        "records_in": sum(c.records for c in checks.values()),
        "records_valid": sum(len(c.conversations) for c in checks.values()),
        "rejected": sum(len(c.errors) for c in checks.values()),
        "duplicates": sum(c.duplicates for c in checks.values()),
        "rejects_by_reason": rejects,
        "datasets": per_dataset,
        "train": length_stats(train_rows, settings.max_length),
        "eval": length_stats(eval_rows, settings.max_length),
        "settings": {
            "max_length": settings.max_length,
            "truncation": settings.truncation,
            "on_error": settings.on_error,
            "eval_size": settings.eval_size,
            "seed": settings.seed,
        },
    }


def metrics_of(report: dict[str, Any]) -> dict[str, float]:
    metrics = {k: report[k] for k in ("records_in", "records_valid", "rejected", "duplicates")}
    for part in ("train", "eval"):
        for key in ("examples", "tokens", "target_tokens", "truncated", "dropped_too_long", "with_tools"):
            metrics[f"{part}_{key}"] = report[part].get(key, 0)
        for key, value in report[part]["length"].items():
            metrics[f"{part}_length_{key}"] = value
    for reason, count in report["rejects_by_reason"].items():
        metrics[f"rejected_{reason}"] = count
    return metrics
