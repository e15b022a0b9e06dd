"""Standard lm-eval tasks over local files: `evaluate.lm_eval.local_data` maps a task of lm-eval's own
catalogue (e.g. `hellaswag`) to a file the user names. The task keeps everything lm-eval defines for it
(its YAML's prompt, choices, process_docs, metrics); only where its documents come from changes: the
file, read here, instead of the hub. Nothing is downloaded.

Formats: json / jsonl / csv / parquet / text (read by `datasets`' packaged builders, which need no
hub), and `llama.cpp-hellaswag`, the six-lines-per-item layout that llama.cpp's
`llama-perplexity --hellaswag` reads (`activity_label: context`, the gold ending 0-3, four endings).

The `benchmark_data` stage (ftq.stages.benchmark_data) records each file's sha256 in
data/benchmarks.json, the DVC dependency of every evaluation: a changed file reevaluates, an absent one
is skipped with a note saying how to get it, and nothing else changes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftq.io import file_sha256
from ftq.schema import LOCAL_FORMATS as FORMATS  # the setting's choices, defined with it

HELLASWAG_LAYOUT = "llama.cpp-hellaswag"
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# where to get the files of the tasks ftq knows by name (shown when the file is absent)
SOURCES = {
    "hellaswag": "HellaSwag's official validation set (10,042 items) in llama.cpp's six-line layout: "
                 "hellaswag_val_full.txt from https://github.com/klosax/hellaswag_text_data (extracted from "
                 "rowanz/hellaswag data/hellaswag_val.jsonl, MIT)",
}


class LocalDataError(ValueError):
    """A local task file that is malformed: the message names the file, the item and the field."""


@dataclass(frozen=True)
class LocalTask:
    task: str
    path: Path
    format: str
    split: str | None  # the task's split the file stands for (None: the split the task evaluates on)
    sample: int  # a seeded sample of the items (0: all)
    seed: int
    given: str = ""  # the path as params.yaml gives it (relative to the project): what the manifest records

    @classmethod
    def from_settings(cls, task: str, cfg: dict, root: Path) -> "LocalTask":
        path = Path(cfg["path"])
        return cls(task, path if path.is_absolute() else (root / path).resolve(), cfg["format"], cfg["split"],
                   int(cfg["sample"]), int(cfg["seed"]), str(cfg["path"]))

    @property
    def builder(self) -> str:
        if self.format != "auto":
            return "json" if self.format == "jsonl" else self.format
        if self.path.suffix not in BUILDERS:
            raise LocalDataError(f"{self.path}: evaluate.lm_eval.local_data.{self.task}.format: cannot tell the "
                                 f"format from '{self.path.suffix}'; set one of {', '.join(FORMATS[1:])}")
        return BUILDERS[self.path.suffix]

    def absent_note(self) -> str:
        source = SOURCES.get(self.task, f"the data of lm-eval's task '{self.task}'")
        return (f"skipped: {self.path} is absent. Get {source}, and put it there or point "
                f"evaluate.lm_eval.local_data.{self.task}.path at it")


def read_hellaswag_layout(path: Path) -> list[dict]:
    """Items of the six-line layout as records of the fields lm-eval's `hellaswag` task reads
    (activity_label, ctx_a, ctx_b, endings, label). The layout holds the raw context `ctx_a + " " + ctx_b`
    in one line, so ctx_b is empty here: lm-eval capitalizes ctx_b's first letter, which this layout
    cannot, and so a score can differ slightly from lm-eval's on the jsonl (the same text llama.cpp sees)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise LocalDataError(f"{path}: {len(lines)} lines is not a whole number of six-line items (item "
                             f"{len(lines) // 6 + 1} at line {len(lines) // 6 * 6 + 1} is cut short)")
    items = []
    for index in range(len(lines) // 6):
        line = index * 6 + 1
        context, label, endings = lines[index * 6], lines[index * 6 + 1].strip(), lines[index * 6 + 2:index * 6 + 6]
        where = f"{path}: item {index} (line {line})"
        if ": " not in context:
            raise LocalDataError(f"{where}: context: expected 'activity label: context', got {context[:60]!r}")
        if label not in ("0", "1", "2", "3"):
            raise LocalDataError(f"{where}: label (line {line + 1}): expected 0, 1, 2 or 3, got {label!r}")
        for number, ending in enumerate(endings):
            if not ending.strip():
                raise LocalDataError(f"{where}: ending {number} (line {line + 2 + number}): empty")
        activity, ctx = context.split(": ", 1)
        items.append({"ind": index, "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                      "endings": endings, "label": label})
    if not items:
        raise LocalDataError(f"{path}: no items")
    return items


def read_records(local: LocalTask) -> list[dict]:
    """Every record of the file, in its order."""
    if not local.path.is_file():
        raise LocalDataError(f"{local.path}: evaluate.lm_eval.local_data.{local.task}.path: no such file")
    if local.format == HELLASWAG_LAYOUT:
        return read_hellaswag_layout(local.path)
    import datasets

    try:
        dataset = datasets.load_dataset(local.builder, data_files=str(local.path), split="train")
    except Exception as exc:  # datasets raises whatever its builder raised
        raise LocalDataError(f"{local.path}: not readable as {local.builder}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not len(dataset):
        raise LocalDataError(f"{local.path}: no records")
    return dataset.to_list()


def sample_indices(total: int, sample: int, seed: int) -> list[int]:
    """A seeded sample of `sample` item indices out of `total` (all when sample is 0 or >= total), in
    file order: the same items for every candidate, as long as the file and the seed are the same."""
    import numpy as np

    if not sample or sample >= total:
        return list(range(total))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=sample, replace=False))


def manifest_entry(local: LocalTask) -> dict:
    """What data/benchmarks.json records of one task's file: present (sha256, size, item count, the
    sampled items) or absent (and how to get it)."""
    # the path as given, not as resolved: a project moved or cloned elsewhere keeps the same manifest
    entry = {"task": local.task, "path": local.given or str(local.path), "format": local.format,
             "sample": local.sample, "seed": local.seed}
    if not local.path.exists():
        return {**entry, "present": False, "note": local.absent_note()}
    records = read_records(local)
    return {**entry, "present": True, "sha256": file_sha256(local.path), "bytes": local.path.stat().st_size,
            "items": len(records), "indices": sample_indices(len(records), local.sample, local.seed)}


def task_config(manager, local: LocalTask, indices: list[int] | None = None) -> dict:
    """lm-eval's own config of the task (its YAML, functions resolved), with its documents read from the
    local file: the split the task evaluates on (or `split`) is the file's items at `indices` (all when
    None), in file order, so lm-eval prepares only the items it scores (HellaSwag's process_docs over all
    10,042 items costs seconds each of the several times lm-eval asks for its documents); document i of
    the task is the file's item indices[i]. The task's training split is dropped."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(local.task)
    if entry is None or entry.yaml_path is None:
        raise LocalDataError(f"evaluate.lm_eval.local_data: '{local.task}' is not a task of lm-eval's catalogue "
                             f"with a YAML config (a group or a Python task cannot be pointed at a file)")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    split = local.split or config.get("test_split") or config.get("validation_split")
    if not split:
        raise LocalDataError(f"evaluate.lm_eval.local_data.{local.task}.split: the task names no test or "
                             f"validation split; say which split the file is")

    def documents(**_):
        import datasets

        records = read_records(local)
        chosen = records if indices is None else [records[i] for i in indices]
        return datasets.DatasetDict({split: datasets.Dataset.from_list(chosen)})

    config.update({"custom_dataset": documents, "dataset_path": str(local.path), "dataset_name": None,
                   "dataset_kwargs": None, "training_split": None,
                   "validation_split": split if config.get("validation_split") or not config.get("test_split") else None,
                   "test_split": split if config.get("test_split") else None})
    if config.get("fewshot_split") not in (None, split):
        config["fewshot_split"] = None
    return config
