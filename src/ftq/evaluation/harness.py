"""EleutherAI's lm-evaluation-harness for one candidate: ftq's own tasks over the project's local files
(src/ftq/evaluation/lm_eval_tasks: held-out multiple choice, held-out generation, rolling-loglikelihood
perplexity over a local text) plus any registered lm-eval task named in `evaluate.lm_eval.tasks` whose
data is available locally. Nothing is downloaded: datasets and the hub run offline.

HF folders (plain, AWQ, GPTQ) go through lm-eval's `hf` model, on the model the stage already loaded.
GGUF files go through lm-eval's `local-completions` model against a local OpenAI-compatible llama.cpp
server that this module starts and stops: ftq's completions app (`ftq.openai.completions`, not the
`ftq serve` gateway) on a loopback port, over the llama.cpp model the stage has loaded. Its
/v1/completions returns exact echo logprobs (llama-cpp-python's own server
shifts them by a token for models without BOS) and its vLLM-style /tokenize endpoints let lm-eval count
tokens with the GGUF's own vocabulary."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ftq import schema
from ftq.io import atomic_write_json, atomic_write_text

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
    """ftq's tasks and the include_path folders; lm-eval's ~15,000 built-in task names are indexed
    (~17 s) only when a requested name isn't among those."""
    from lm_eval.tasks import TaskManager

    paths = [str(PROJECT_TASKS)] + [str(p if Path(p).is_absolute() else root / p) for p in cfg["include_path"]]
    metadata = {"ftq_root": str(root), "ftq_choices": int(cfg["choices"]), "ftq_seed": int(cfg["seed"])}
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


@contextlib.contextmanager
def local_server(runtime, name: str, context: int, timeout: float = 60) -> Iterator[str]:
    """ftq's completions app (`ftq.openai.completions`) on a free loopback port, in a thread, over the
    model the stage has already loaded; stopped when the block ends. Yields its completions URL."""
    import uvicorn

    from ftq.openai.completions import completions_app
    from ftq.openai.schema import Limits
    from ftq.processes import free_port

    path = Path(runtime.path)
    app = completions_app(runtime, name, Limits(max_tokens=1024, default_max_tokens=256, max_prompt_tokens=context,
                                                 # lm-eval's own batches on a private loopback port: no caps
                                                 max_batch_prompts=1 << 20, max_batch_tokens=1 << 40,
                                                 max_body_bytes=1 << 40))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="ftq-lm-eval-server", daemon=True)
    thread.start()
    try:
        deadline = time.time() + timeout
        while not server.started:
            if not thread.is_alive() or time.time() > deadline:
                raise LmEvalError(f"{path}: the local llama.cpp server did not start on port {port}")
            time.sleep(0.05)
        log.info("lm-eval: %s served on http://127.0.0.1:%d (llama.cpp)", name, port)
        yield f"http://127.0.0.1:{port}/v1/completions"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def hf_model(runtime, cfg: dict):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=runtime.model, tokenizer=runtime.tokenizer, batch_size=int(cfg["batch_size"]),
                max_length=int(cfg["max_length"]), max_gen_toks=int(cfg["max_gen_toks"]),
                device=str(runtime.model.device))


def completions_model(base_url: str, name: str, cfg: dict):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class ServedCompletions(LocalCompletionsAPI):
        # lm-eval 0.4.13 hands the raw message list on as the context when the tokenizer is remote, and
        # then fails to encode it; render it with the served model's own chat template instead
        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True):
            return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    return ServedCompletions(base_url=base_url, model=name, tokenizer_backend="remote", tokenized_requests=True,
                               batch_size=int(cfg["batch_size"]), max_length=int(cfg["max_length"]),
                               max_gen_toks=int(cfg["max_gen_toks"]), num_concurrent=1, max_retries=2, timeout=600)


def evaluate(lm, manager, cfg: dict, own: list[str], others: list[str]) -> list[dict]:
    import lm_eval

    runs = []
    for tasks, chat in ((own, True), (others, bool(cfg["apply_chat_template"]))):
        if tasks:
            runs.append(lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=int(cfg["limit"]) or None,
                num_fewshot=cfg["num_fewshot"], apply_chat_template=chat, log_samples=True, random_seed=0,
                numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0))
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


def plan(cfg: dict, root: Path, where: str) -> Plan:
    """Resolve and load every task up front (before any model is loaded), offline."""
    go_offline()
    manager = task_manager(root, cfg)
    own, others = split_tasks(manager, list(cfg["tasks"]), where)
    return Plan(cfg, manager, own, others)


def run(runtime, name: str, planned: Plan, out_dir: Path) -> dict[str, Any]:
    """Evaluate with lm-eval; writes <out_dir>/<name>.json (results) and <name>.samples.jsonl (every
    scored document); returns the flat metrics for reports/eval/<name>.json."""
    from lm_eval import __version__ as lm_eval_version

    cfg = planned.cfg
    if not planned.own and not planned.others:  # the stage's outputs still exist (DVC declares them), empty
        atomic_write_json(out_dir / f"{name}.json", {"candidate": name, "lm_eval_version": lm_eval_version,
                                                     "settings": cfg, "results": {}, "note": "no lm-eval tasks"})
        atomic_write_text(out_dir / f"{name}.samples.jsonl", "")
        return {}
    started = time.time()
    if runtime.kind == "llama.cpp":
        with local_server(runtime, name, int(cfg["max_length"]) + 64) as url:
            runs = evaluate(completions_model(url, name, cfg), planned.manager, cfg, planned.own, planned.others)
    else:
        runs = evaluate(hf_model(runtime, cfg), planned.manager, cfg, planned.own, planned.others)
    results = {task: metrics for r in runs for task, metrics in r["results"].items()}
    report = {"candidate": name, "lm_eval_version": lm_eval_version, "settings": cfg,
              "model": "local-completions (ftq serve, llama.cpp)" if runtime.kind == "llama.cpp" else "hf",
              "results": results, "n_samples": {k: v for r in runs for k, v in (r.get("n-samples") or {}).items()},
              "versions": {k: v for r in runs for k, v in (r.get("versions") or {}).items()},
              "seconds": round(time.time() - started, 2)}
    atomic_write_json(out_dir / f"{name}.json", json.loads(json.dumps(report, default=str)))
    atomic_write_text(out_dir / f"{name}.samples.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in sample_rows(runs)))
    return {**flatten(results), "lm_eval_seconds": report["seconds"]}
