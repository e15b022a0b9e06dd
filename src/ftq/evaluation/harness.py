"""EleutherAI's lm-evaluation-harness for one candidate: ftq's own tasks over the project's local files
(src/ftq/evaluation/lm_eval_tasks: held-out generation, rolling-loglikelihood perplexity over a local
text), standard tasks of lm-eval's catalogue over files the user names (`evaluate.lm_eval.local_data`,
e.g. HellaSwag; ftq.evaluation.local_data), and any other registered task named in
`evaluate.lm_eval.tasks` whose data is in the local Hugging Face cache. Nothing is downloaded: datasets
and the hub run offline.

HF folders (plain, AWQ, GPTQ) go through lm-eval's `hf` model (scoring the requests that share a context
together: ftq.evaluation.transformers_lm), GGUF files through ftq's in-process llama.cpp model
(ftq.evaluation.llamacpp_lm), each on the model the stage has already loaded."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ftq import schema
from ftq.evaluation import local_data
from ftq.io import atomic_write_json, atomic_write_text, file_sha256

log = logging.getLogger(__name__)

PROJECT_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
PROJECT_PREFIX = "ftq"  # ftq's own tasks are chat tasks: always run with the candidate's chat template
class LmEvalError(ValueError):
    """A task that cannot run: unknown, or its data isn't local."""


def settings(cfg: dict[str, Any] | None, path: str = "params.yaml") -> dict[str, Any]:
    """The `evaluate.lm_eval` block on its own, validated and completed by ftq.schema."""
    return schema.part("evaluate.lm_eval", cfg, path)


def go_offline() -> None:
    """Never fetch a dataset or a file from the hub: a task whose data isn't local fails, clearly."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def task_manager(root: Path, cfg: dict):
    """ftq's tasks and the include_path folders; lm-eval's ~15,000 built-in task names are indexed (slow)
    only when a requested name isn't among those."""
    from lm_eval.tasks import TaskManager

    paths = [str(PROJECT_TASKS)] + [str(p if Path(p).is_absolute() else root / p) for p in cfg["include_path"]]
    metadata = {"ftq_root": str(root)}
    if cfg["text"]:
        metadata["ftq_text"] = str(cfg["text"] if Path(cfg["text"]).is_absolute() else root / cfg["text"])
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(t in local.all_tasks for t in cfg["tasks"]):
        return local
    return _full_task_manager(tuple(paths), tuple(sorted(metadata.items())))


@functools.lru_cache(maxsize=4)
def _full_task_manager(paths: tuple[str, ...], metadata: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), metadata=dict(metadata))


def split_tasks(manager, tasks: list[str], where: str) -> tuple[list[str], list[str]]:
    """(ftq's chat tasks, the others); unknown names and tasks whose data is not local are errors here,
    before any model time is spent."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LmEvalError(f"{where}: evaluate.lm_eval.tasks: unknown lm-eval task(s) {unknown} (not a registered "
                          f"task, group or tag, nor in evaluate.lm_eval.include_path)")
    for name in tasks:
        try:
            manager.load_task_or_group([name])
        except Exception as exc:  # lm-eval raises whatever datasets raised
            raise LmEvalError(
                f"{where}: evaluate.lm_eval.tasks: task '{name}' cannot load its data offline: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. ftq never downloads at "
                f"run time: put the dataset in the local Hugging Face cache (load it once where there is network, "
                f"then copy ~/.cache/huggingface) or point a task YAML in evaluate.lm_eval.include_path at local "
                f"files") from exc
    own = [t for t in tasks if t == PROJECT_PREFIX or t.startswith(PROJECT_PREFIX + "_")]
    return own, [t for t in tasks if t not in own]


def hf_model(runtime, cfg: dict):
    from ftq.evaluation.transformers_lm import SharedContextHFLM

    return SharedContextHFLM(pretrained=runtime.model, tokenizer=runtime.tokenizer, batch_size=int(cfg["batch_size"]),
                max_length=int(cfg["max_length"]), max_gen_toks=int(cfg["max_gen_toks"]),
                device=str(runtime.model.device))


def gguf_model(runtime, cfg: dict):
    from ftq.evaluation.llamacpp_lm import LlamaCppLM

    return LlamaCppLM(runtime, max_length=int(cfg["max_length"]), max_gen_toks=int(cfg["max_gen_toks"]))


def evaluate(lm, planned: "Plan") -> list[dict]:
    """One lm-eval run per kind of task: ftq's own (with the chat template, `limit` documents), the
    other named tasks (`limit`), and the local standard tasks (their seeded samples; lm-eval takes
    either a limit or samples per run)."""
    import lm_eval

    cfg = planned.cfg
    common = dict(model=lm, num_fewshot=cfg["num_fewshot"], log_samples=True, random_seed=0, numpy_random_seed=0,
                  torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0)
    runs = []
    for tasks, chat in ((planned.own, True), (planned.others, bool(cfg["apply_chat_template"]))):
        if tasks:
            runs.append(lm_eval.simple_evaluate(tasks=tasks, task_manager=planned.manager, apply_chat_template=chat,
                                                limit=int(cfg["limit"]) or None, **common))
    if planned.local:
        run = lm_eval.simple_evaluate(
            tasks=[local_data.task_config(planned.catalogue[t.task], t, entry["indices"]) for t, entry in planned.local],
            task_manager=planned.manager, apply_chat_template=bool(cfg["apply_chat_template"]), limit=None, **common)
        for task, entry in planned.local:  # the task's document i is the file's item indices[i]
            for sample in (run.get("samples") or {}).get(task.task, []):
                sample["doc_id"] = entry["indices"][int(sample["doc_id"])]
        runs.append(run)
    return runs


def flatten(results: dict[str, dict]) -> dict[str, float]:
    """{"lm_eval_<task>_<metric>": value} for every task's metrics (filter `none` left out of the name)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            suffix = "" if filter_name == "none" else f"_{filter_name}"
            flat[f"lm_eval_{task}_{metric}{suffix}"] = round(float(value), 6)
    return flat


SAMPLE_FIELDS = ("task", "doc_id", "doc", "target", "response")  # a samples row's fields besides its metrics


def sample_rows(runs: list[dict]) -> list[dict]:
    """Every scored document: the doc, the target, the (filtered) response and its per-sample metrics."""
    rows = []
    for run in runs:
        for task, samples in (run.get("samples") or {}).items():
            metrics = {key.split(",")[0] for key in run["results"].get(task, {})}
            for sample in samples:
                rows.append({"task": task, "doc_id": sample.get("doc_id"), "doc": sample.get("doc"),
                             "target": sample.get("target"), "response": sample.get("filtered_resps"),
                             **{k: sample[k] for k in metrics if k in sample}})
    return rows


@dataclass
class Plan:
    cfg: dict
    manager: Any
    own: list[str]
    others: list[str]
    # local standard tasks whose file is present, with their data/benchmarks.json entry
    local: list[tuple[local_data.LocalTask, dict]] = field(default_factory=list)
    catalogue: dict[str, Any] = field(default_factory=dict)  # task -> a TaskManager that knows it
    skipped: dict[str, str] = field(default_factory=dict)  # local task -> why it is skipped

    @property
    def empty(self) -> bool:
        return not (self.own or self.others or self.local)


def catalogue_manager(task: str):
    """A TaskManager that knows `task` from lm-eval's catalogue: its own folder's (lm_eval/tasks/<task>,
    fast) when that holds it, else the whole catalogue's (slow to index)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = Path(lm_eval.tasks.__file__).parent / task
    if folder.is_dir():
        manager = TaskManager(include_path=[str(folder)], include_defaults=False)
        if task in manager.task_index:
            return manager
    return _full_task_manager((), ())


def local_tasks(cfg: dict, root: Path, manifest: dict[str, dict], where: str) -> tuple[list, dict[str, str]]:
    """(present local tasks with their manifest entries, {absent task: note}); the manifest must have
    been written for the same settings and the file must not have changed since."""
    present, skipped = [], {}
    for task, block in sorted(cfg["local_data"].items()):
        local = local_data.LocalTask.from_settings(task, block, root)
        entry = manifest.get(task)
        stale = (entry is None or entry["path"] != local.given or entry["sample"] != local.sample
                 or entry["seed"] != local.seed or entry["format"] != local.format
                 or entry["present"] != local.path.exists()
                 or (entry["present"] and entry["sha256"] != file_sha256(local.path)))
        if stale:
            raise LmEvalError(f"{where}: evaluate.lm_eval.local_data.{task}: data/benchmarks.json does not describe "
                              f"{local.path} as it is now; run `dvc repro benchmark_data` (or `ftq benchmark-data`)")
        if entry["present"]:
            present.append((local, entry))
        else:
            skipped[task] = entry["note"]
    return present, skipped


def plan(cfg: dict, root: Path, where: str, manifest: dict[str, dict] | None = None) -> Plan:
    """Resolve and load every task up front (before any model is loaded), offline. `manifest` is
    data/benchmarks.json (the benchmark_data stage's record of the local files)."""
    go_offline()
    manager = task_manager(root, cfg)
    named = [t for t in cfg["tasks"] if t not in cfg["local_data"]]
    own, others = split_tasks(manager, named, where)
    local, skipped = local_tasks(cfg, root, manifest or {}, where)
    catalogue = {t.task: catalogue_manager(t.task) for t, _ in local}
    for task, entry in local:
        local_data.task_config(catalogue[task.task], task)  # an unknown task fails here, before any model time
    for task, note in skipped.items():
        log.warning("lm-eval: %s %s", task, note)
    return Plan(cfg, manager, own, others, local, catalogue, skipped)


def run(runtime, name: str, planned: Plan, out_dir: Path) -> dict[str, Any]:
    """Evaluate with lm-eval; writes <out_dir>/<name>.json (results) and <name>.samples.jsonl (every
    scored document); returns the flat metrics for reports/eval/<name>.json."""
    from lm_eval import __version__ as lm_eval_version

    cfg = planned.cfg
    skipped = dict(planned.skipped)
    if planned.empty:  # the stage's outputs still exist (DVC declares them), empty
        atomic_write_json(out_dir / f"{name}.json", {"candidate": name, "lm_eval_version": lm_eval_version,
                                                     "settings": cfg, "results": {}, "skipped": skipped,
                                                     "note": "no lm-eval tasks"})
        atomic_write_text(out_dir / f"{name}.samples.jsonl", "")
        return {}
    started = time.time()
    dtype = scoring_dtype(runtime, cfg["dtype"])
    lm = gguf_model(runtime, cfg) if runtime.kind == "llama.cpp" else hf_model(runtime, cfg)
    try:
        runs = evaluate(lm, planned)
    finally:
        if hasattr(lm, "close"):
            lm.close()  # llama.cpp's scoring context
    results = {task: metrics for r in runs for task, metrics in r["results"].items()}
    report = {"candidate": name, "lm_eval_version": lm_eval_version, "settings": cfg,
              "model": "ftq llama.cpp (in process)" if runtime.kind == "llama.cpp" else "hf",
              "dtype": dtype, "results": results, "n_samples": {k: v for r in runs for k, v in (r.get("n-samples") or {}).items()},
              "versions": {k: v for r in runs for k, v in (r.get("versions") or {}).items()},
              "local_data": {t.task: {k: v for k, v in entry.items() if k != "indices"} for t, entry in planned.local},
              "skipped": skipped, "seconds": round(time.time() - started, 2)}
    atomic_write_json(out_dir / f"{name}.json", json.loads(json.dumps(report, default=str)))
    atomic_write_text(out_dir / f"{name}.samples.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in sample_rows(runs)))
    return {**flatten(results), "lm_eval_seconds": report["seconds"], "lm_eval_dtype": dtype}


def scoring_dtype(runtime, setting: str) -> str | None:
    """What lm-eval scores a candidate in (`evaluate.lm_eval.dtype`; None for GGUF, AWQ and GPTQ, which
    compute as their kernels do). A plain HF model is cast in place when the setting asks for another
    dtype than it was loaded in: the evaluate stage scores last and closes the runtime after, so task
    answers, speed and perplexity keep the stored dtype (greedy answers in bf16 change with how they
    are batched; log-likelihood scoring moves only a handful of HellaSwag items, bench/benchmarks.py).
    Generate-until tasks named in evaluate.lm_eval.tasks run in this dtype too (set float32 for them)."""
    from ftq.hf import compute_dtype

    if runtime.kind != "transformers" or getattr(runtime.model.config, "quantization_config", None):
        return None
    wanted = compute_dtype(setting, runtime.dtype)
    if wanted != runtime.dtype:
        import torch

        runtime.model.to(getattr(torch, wanted))
        runtime.dtype = wanted
    return wanted
