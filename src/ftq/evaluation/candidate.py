"""One candidate (`base`, `merged`, or a build in models/quantized/) measured the same
way as every other, by its own runtime (transformers for HF folders, AWQ and GPTQ; llama.cpp for GGUF).

dvc.yaml runs it for base and merged (stages evaluate_base, evaluate_merged); the builds are evaluated by
stage `ladder` (ftq.stages.ladder), which runs this for each build that passed its screen, smallest first.
Outputs, in reports/eval/ for base and merged and reports/eval/builds/ for a build (`report_dir`):
  <candidate>.json               metrics (DVC metrics: `dvc metrics diff`, `dvc exp show`)
  <candidate>.answers.jsonl      the candidate's answers to the held-out prompts
  lm_eval/<candidate>.json       lm-eval results (+ .samples.jsonl: every scored document)
  <candidate>.preference.jsonl   per held-out preference pair, where preference tuning ran
  <candidate>.forced.jsonl       per held-out example, the reference answer teacher-forced: its mean
                                 log-probability and KL divergence from merged (ftq.evaluation.forced;
                                 merged's evaluation also writes merged's distribution, layout.HELDOUT_REFERENCE)
Metrics: task accuracy on the held-out split (exact match, JSON validity and field accuracy, ROUGE-L),
the reference answers' teacher-forced log-probability and KL divergence from merged (no generation),
held-out perplexity, lm-eval (ftq's own tasks and any standard task with local data; see
ftq.evaluation.harness), preference pairs (pref_accuracy, reward margin, logp accuracy against the model
preference tuning started from; ftq.evaluation.preference), MT-Bench when a judge is configured, and efficiency (size, load time, time to
first token, tokens/s, peak memory). Speed is measured `speed_repeats` times, each beside merged (in
transformers) on the same prompts: `relative_tokens_per_second`, the median paired ratio, is what
candidates are compared on, since absolute tokens/s moves 2-4x with machine load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from ftq.data import tools
from ftq.evaluation import benchmark_scores, forced, harness
from ftq.evaluation import preference as preference_scoring
from ftq.io import atomic_write_json, atomic_write_text, dir_size
from ftq import layout, schema
from ftq.layout import BUILDS_ROOT, EVAL_ROOT, eval_dir
from ftq.params import repo_root
from ftq.provenance import stamp

log = logging.getLogger(__name__)

def mt_bench(runtime, cfg: dict, root: Path, out: Path) -> dict:
    """MT-Bench scores, or the reason it was skipped; answers and judgments go to <out>."""
    from ftq.evaluation import mt_bench as bench

    mt = cfg["mt_bench"]
    judge = mt["judge"]
    out.unlink(missing_ok=True)  # never leave an earlier run's judgments beside a skipped one
    if not mt["path"]:
        return {"mt_bench_status": "skipped: no questions configured (evaluate.mt_bench.path)"}
    if not judge.get("base_url") or not judge.get("model"):
        return {"mt_bench_status": "skipped: no judge configured (evaluate.mt_bench.judge.base_url and .model)"}
    folder = Path(mt["path"]) if Path(mt["path"]).is_absolute() else root / mt["path"]
    scores, rows = bench.run(runtime, folder, bench.Judge(judge["base_url"], judge["model"], judge.get("api_key_env"),
                                                          int(mt["retries"])),
                             int(mt["limit"]), int(mt["max_new_tokens"]))
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    status = "ok" if scores["mt_bench_judged"] else "failed: the judge gave no parsable [[rating]]"
    return {**scores, "mt_bench_status": status, "mt_bench_judge": judge["model"]}


class ScreenedOut(ValueError):
    """A build that failed its quantize check is never evaluated."""


def candidate_path(root: Path, name: str) -> Path:
    """Where a candidate's artifact lives: models/base, models/merged or models/quantized/<name>."""
    if name in ("base", "merged"):
        path = root / "models" / name
    else:
        folder = root / "models" / "quantized" / name
        manifest = folder / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"{folder}: no build '{name}' (run `dvc repro quantize@{name}`)")
        built = json.loads(manifest.read_text())
        if not built.get("check", {}).get("passed", True):
            raise ScreenedOut(f"build '{name}' failed its screen (quantize check: "
                              f"{'; '.join(built['check'].get('failures') or [])}): it is recorded, not evaluated")
        path = folder / (built.get("artifact") or "")
    if not path.exists():
        raise FileNotFoundError(f"{path}: candidate '{name}' is missing; run the stage that makes it first")
    return path


def task_examples(root: Path, cfg: dict, count: str = "task_examples") -> list[dict]:
    """The held-out conversations every candidate answers (the train split when there is no held-out one):
    `cfg[count]` of them (0: all); `forced_examples` sizes the teacher-forced set apart from the answered one."""
    from ftq.evaluation import task

    examples_file = root / "data" / "processed" / "eval.jsonl"
    if not examples_file.exists() or not examples_file.read_text().strip():
        examples_file = root / "data" / "processed" / "train.jsonl"
    manifest = root / "data" / "processed" / "manifest.json"
    rendering = json.loads(manifest.read_text()).get("tool_rendering") if manifest.exists() else None
    return task.load_examples(examples_file, int(cfg[count]) or -1, rendering or tools.FALLBACK)


def speed_reference(root: Path, name: str):
    """Opens the model every candidate's speed is measured against, in the same run: merged in
    transformers (None when the candidate is merged itself)."""
    from ftq.runtimes import open_model

    if name == "merged":
        return None
    path = candidate_path(root, "merged")
    return lambda: open_model(path)


def answers(runtime, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
            tool_lists: list | None = None) -> Iterator[str]:
    """Greedy answers, in batches where the runtime generates batches (transformers); llama.cpp's
    Python API decodes one sequence at a time, so GGUF candidates answer one by one. Conversations with
    tools for the chat template itself (`tool_lists`) answer one by one too."""
    if tool_lists and any(tool_lists):
        for conversation, shown_tools in zip(conversations, tool_lists):
            yield (runtime.chat(conversation, max_new_tokens=max_new_tokens, tools=shown_tools) if shown_tools
                   else runtime.chat(conversation, max_new_tokens=max_new_tokens))
        return
    if batch_size > 1 and hasattr(runtime, "chat_batch"):
        for start in range(0, len(conversations), batch_size):
            yield from runtime.chat_batch(conversations[start:start + batch_size], max_new_tokens=max_new_tokens)
        return
    for conversation in conversations:
        yield runtime.chat(conversation, max_new_tokens=max_new_tokens)


def answer_all(runtime, examples: list[dict], max_new_tokens: int, batch_size: int = 1) -> list[dict]:
    from ftq.evaluation.task import score

    rows = []
    generated = answers(runtime, [e["prompt"] for e in examples], max_new_tokens, batch_size,
                        [e.get("tools") for e in examples])
    for example, answer in zip(examples, generated):
        rows.append({"id": example["id"], "prompt": example["prompt"][-1]["content"], "reference": example["reference"],
                     "answer": answer, **score(answer, example["reference"], example.get("reference_calls"))})
    return rows


def preference_rows(runtime, params: dict[str, Any], root: Path) -> list[dict]:
    """This candidate's scores on the held-out preference pairs, against the model preference tuning
    started from (ftq.evaluation.preference); none where no preference tuning ran."""
    found = preference_scoring.held_out_reference(params, root)
    if found is None:
        return []
    pairs, beta = found
    return preference_scoring.candidate_rows(runtime, pairs, beta)


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merged_lm_eval_samples(root: Path, planned) -> list[dict] | None:
    """merged's per-item lm-eval scores, which every other candidate's local standard tasks are paired
    with (None when there are no such tasks)."""
    if not planned.local:
        return None
    path = root / EVAL_ROOT / "lm_eval" / "merged.samples.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; evaluate merged first (`dvc repro evaluate_merged`): every "
                                f"candidate's {', '.join(t.task for t, _ in planned.local)} is paired with merged's")
    return read_samples(path)


def benchmark_section(planned, samples: Path, merged_samples: list[dict] | None) -> dict[str, dict]:
    """Each local standard task: its file, the items scored, and each metric's mean, interval and
    paired difference vs merged; or why it was skipped."""
    section = {task: {"status": note} for task, note in planned.skipped.items()}
    rows = read_samples(samples) if planned.local else []
    for local, entry in planned.local:
        metrics = sorted({k for row in rows if row.get("task") == local.task for k, v in row.items()
                          if k not in harness.SAMPLE_FIELDS and isinstance(v, (int, float))})
        section[local.task] = {"status": "ok", "path": entry["path"], "sha256": entry["sha256"],
                               "items": len(entry["indices"]), "of": entry["items"],
                               "metrics": benchmark_scores.summary(rows, local.task, metrics, merged_samples, 0.95)}
    return section


class Phases:
    """Seconds spent in each named part of the stage, for the report (where does an evaluation's time go)."""

    def __init__(self, **seconds: float):
        self.seconds = {k: round(v, 2) for k, v in seconds.items()}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 2)


# the per-example rows a promotion metric is read from: <candidate>.<kind>.jsonl
KINDS = ("answers", "preference", "forced")


def metric_kind(metric: str) -> str:
    """Which rows hold `metric`: the task answers' (task_*), the held-out pairs' (pref_*) or the teacher-forced
    scores' (forced_*)."""
    from ftq.promotion.policy import PREFERENCE_KEYS

    return "preference" if metric in PREFERENCE_KEYS else "forced" if metric in forced.KEYS else "answers"


def forced_rows(runtime, params: dict[str, Any], root: Path, name: str) -> list[dict]:
    """The candidate's teacher-forced rows (ftq.evaluation.forced). merged's evaluation computes and stores
    merged's distribution on the held-out answers (its own rows read from it), which every other candidate is
    scored against."""
    from ftq.io import atomic_dir
    from ftq.quantize import distance

    folder = root / layout.HELDOUT_REFERENCE
    cfg = schema.settings(params, "evaluate")
    examples = task_examples(root, cfg, "forced_examples")
    if name == "merged":
        tokenizer = getattr(runtime, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"merged opened in {runtime.kind}, which has no tokenizer to encode the held-out answers")
        computed = forced.reference(runtime, tokenizer, examples, int(cfg["forced_top_k"]), context_size(cfg))
        with atomic_dir(folder) as tmp:
            distance.save(computed, tmp)
        return forced.own_rows(distance.load(folder))
    if not (folder / distance.META).exists():
        raise FileNotFoundError(f"{folder}: merged's held-out distribution is missing; every candidate's "
                                "teacher-forced scores are measured against it (`dvc repro evaluate_merged` first)")
    stored = distance.load(folder)
    forced.check_examples(stored, examples, int(cfg["forced_top_k"]), folder)
    return forced.rows(runtime, stored)


def scored_rows(runtime, params: dict[str, Any], root: Path, metric: str, name: str) -> list[dict]:
    """A candidate's per-example rows for one promotion metric, as the full evaluation writes them: its answers
    to the held-out examples (task_*), its scores on the held-out preference pairs (pref_*), or its
    teacher-forced scores of the held-out answers (forced_*)."""
    kind = metric_kind(metric)
    if kind == "preference":
        return preference_rows(runtime, params, root)
    if kind == "forced":
        return forced_rows(runtime, params, root, name)
    cfg = schema.settings(params, "evaluate")
    return answer_all(runtime, task_examples(root, cfg), int(cfg["max_new_tokens"]), int(cfg["answer_batch_size"]))


def metric_rows(params: dict[str, Any], name: str, metric: str) -> list[dict]:
    """scored_rows with the candidate opened and closed: stage ladder's first look at a build, seconds where
    the full evaluation takes minutes."""
    from ftq.runtimes import open_model

    cfg = schema.settings(params, "evaluate")
    root = repo_root()
    runtime = open_model(candidate_path(root, name), n_ctx=context_size(cfg))
    try:
        return scored_rows(runtime, params, root, metric, name)
    finally:
        runtime.close()


def lm_eval_rows(params: dict[str, Any], name: str) -> tuple[dict, list[dict]]:
    """A candidate scored on the lm-eval tasks alone (ftq's and the standard ones over local files, among
    them the general-ability guard's), written where its full evaluation writes them
    (<eval_dir>/lm_eval/<name>.json and .samples.jsonl): lm-eval's flat scores, to hand to `evaluate`
    (lm_eval_done) so that the full evaluation does not score them again, and the per-item rows."""
    from ftq.runtimes import open_model

    cfg = schema.settings(params, "evaluate")
    root = repo_root()
    plan = harness.plan(cfg["lm_eval"], root, params.get("_path", "params.yaml"), layout.read_benchmark_manifest(root))
    out = root / eval_dir(name) / "lm_eval"
    runtime = open_model(candidate_path(root, name), n_ctx=context_size(cfg))
    try:
        scores = harness.run(runtime, name, plan, out)
    finally:
        runtime.close()
    samples = out / f"{name}.samples.jsonl"
    return scores, read_samples(samples) if samples.exists() else []


def context_size(cfg: dict) -> int:
    """The context every evaluation opens a candidate with: room for the longest perplexity and lm-eval row."""
    return max(2048, int(cfg["perplexity_max_length"]) + 8, int(cfg["lm_eval"]["max_length"]) + 64)


def evaluate(params: dict[str, Any], name: str, scored: dict[str, list[dict]] | None = None,
             lm_eval_done: dict | None = None) -> dict[str, Any]:
    """`scored`: the candidate's rows from metric_rows (stage ladder's first look) by kind (KINDS), used as
    they are instead of scoring again, so the full evaluation holds the very rows the ladder decided on;
    `lm_eval_done`: lm_eval_rows' scores, likewise."""
    from ftq.evaluation import general, speed, task
    from ftq.quantize.calibration import heldout
    from ftq.quantize.check import perplexity
    from ftq.runtimes import artifact_format, open_model
    from ftq.memory import peak_memory, release
    from ftq.tracking import stage_run

    cfg = schema.settings(params, "evaluate")
    root = repo_root()
    path = candidate_path(root, name)
    out = root / eval_dir(name)
    examples = task_examples(root, cfg)
    sequences = heldout(root, int(cfg["perplexity_examples"]), int(cfg["perplexity_max_length"]))
    lm_eval_plan = harness.plan(cfg["lm_eval"], root, params.get("_path", "params.yaml"), layout.read_benchmark_manifest(root))
    merged_samples = None if name == "merged" else merged_lm_eval_samples(root, lm_eval_plan)
    with stage_run("evaluate", params, run_name=f"evaluate@{name}", block_values={"candidate": name, **cfg}) as tracked:
        started = time.time()
        n_ctx = context_size(cfg)
        runtime = open_model(path, n_ctx=n_ctx)
        runtime.chat([{"role": "user", "content": "Hi"}], max_new_tokens=1)  # llama.cpp loads on first use
        load_seconds = time.time() - started
        runtime_kind = runtime.kind
        phases = Phases(load=load_seconds)
        scored = scored or {}
        with phases("task"):
            rows = scored.get("answers") or answer_all(runtime, examples, int(cfg["max_new_tokens"]),
                                                       int(cfg["answer_batch_size"]))
        with phases("forced"):
            # base is not made from merged: its distance from merged measures the fine-tune, not a build's
            # fidelity, and no decision reads it (a forward pass over every held-out example saved)
            teacher_forced = scored.get("forced") or ([] if name == "base" else forced_rows(runtime, params, root, name))
        questions = cfg["general"]["questions"]
        with phases("general"):
            general_scores, general_rows = general.score(questions, list(answers(
                runtime, general.conversations(questions), int(cfg["general"]["max_new_tokens"]),
                int(cfg["answer_batch_size"]))))
        with phases("perplexity"):
            ppl = perplexity(runtime, sequences)
        with phases("mt_bench"):
            mt_scores = mt_bench(runtime, cfg, root, out / f"{name}.mt_bench.jsonl")
        with phases("lm_eval"):
            lm_eval_scores = lm_eval_done if lm_eval_done is not None else \
                harness.run(runtime, name, lm_eval_plan, out / "lm_eval")
        with phases("preference"):
            pref_rows = scored["preference"] if "preference" in scored else preference_rows(runtime, params, root)
        benchmarks = benchmark_section(lm_eval_plan, out / "lm_eval" / f"{name}.samples.jsonl",
                                       merged_samples)
        runtime.close()  # speed opens the candidate and merged in turn: one model in memory at a time
        del runtime
        release()
        with phases("speed"):
            efficiency = speed.measure_relative(lambda: open_model(path, n_ctx=n_ctx), speed_reference(root, name),
                                                list(cfg["speed_prompts"]), int(cfg["speed_max_new_tokens"]),
                                                int(cfg["speed_repeats"]))
        size = path.stat().st_size if path.is_file() else dir_size(path)
        report = {
            "candidate": name,
            "format": artifact_format(path),
            "runtime": runtime_kind,
            **{f"task_{k}": v for k, v in task.aggregate(rows).items()},
            **(forced.aggregate(teacher_forced) if teacher_forced else {}),
            **general_scores,
            "perplexity": round(ppl, 4),
            "perplexity_tokens": sum(sum(t[1:]) for t in sequences.targets),
            "size_bytes": size,
            **efficiency,
            **lm_eval_scores,
            **{k: v for task, b in benchmarks.items() if "metrics" in b
               for k, v in benchmark_scores.flat(task, b["metrics"]).items()},
            "benchmarks": benchmarks,
            **(preference_scoring.flat(preference_scoring.summary(pref_rows)) if pref_rows else {}),
            "preference": preference_scoring.summary(pref_rows) if pref_rows else {
                "status": "no preference tuning made merged (preference.objective none)"},
            **mt_scores,
            "load_seconds": round(load_seconds, 3),
            "answer_seconds": phases.seconds["task"],
            "phase_seconds": phases.seconds,  # where the stage's time went
            **peak_memory(),
            "wall_seconds": round(time.time() - started, 2),
        }
        answers_file = out / f"{name}.answers.jsonl"
        atomic_write_text(answers_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        pref_file = out / f"{name}.preference.jsonl"
        atomic_write_text(pref_file, "".join(json.dumps(r) + "\n" for r in pref_rows))
        forced_file = out / f"{name}.forced.jsonl"
        atomic_write_text(forced_file, "".join(json.dumps(r) + "\n" for r in teacher_forced))
        general_answers = out / f"{name}.general.jsonl"
        atomic_write_text(general_answers, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in general_rows))
        report = stamp(report)
        atomic_write_json(out / f"{name}.json", report)
        tracked.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
        tracked.log_metrics({f"mt_bench_{c}": v for c, v in (report.get("mt_bench_categories") or {}).items()
                             if v is not None})
        tracked.set_tags({"evaluate.candidate": name, "evaluate.format": report["format"], "evaluate.path": str(path),
                          **{f"evaluate.benchmark.{task}": (f"{b['items']} of {b['of']} items, {b['path']} sha256 "
                                                            f"{b['sha256']}" if b["status"] == "ok" else b["status"])
                             for task, b in benchmarks.items()}})
        tracked.log_artifact(out / f"{name}.json")
        tracked.log_artifact(answers_file)
        tracked.log_artifact(pref_file)
        tracked.log_artifact(forced_file)
        tracked.log_artifact(general_answers)
        tracked.log_artifact(out / f"{name}.mt_bench.jsonl")
        for suffix in (".json", ".samples.jsonl"):
            tracked.log_artifact(out / "lm_eval" / f"{name}{suffix}")
    log.info("%s: task %s, perplexity %.3f, %s tok/s, %s bytes", name,
             {k: v for k, v in report.items() if k.startswith("task_")}, ppl, report["tokens_per_second"], size)
    return report
