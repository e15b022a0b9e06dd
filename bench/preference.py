"""DPO after the demo's SFT, measured by the pipeline itself against the SFT model it started from.

    .venv/bin/python bench/preference.py            # after `make demo` (its SFT adapter, dvc.lock and cache)
    .venv/bin/python bench/preference.py --table    # README's table, from the committed report

A git clone of this project in a temporary folder shares the project's DVC cache, so `dvc repro` there
finds base, prepare and train up to date (the demo's SFT adapter, byte for byte), and README's documented
run, `ftq run --exp -S preference.objective=dpo -S 'preference.loss_type=[sigmoid,sft]'
-S preference.learning_rate=1e-4 --name dpo`, with the
target evaluate_merged runs only `preference` (DPO on data/raw/ftq_default/preference.json, the stage's
defaults but for what -S sets), `merge`, `benchmark_data` and `evaluate_merged`. The DPO model
is then set beside the demo's own merged SFT model, both as the evaluate stage scored them, on the same
held-out task examples and the same HellaSwag items (pairs by example id: ftq.evidence and
ftq.evaluation.benchmark_scores). Writes reports/bench/preference.json, and the DPO model's answers to
reports/bench/preference.answers.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OUT = ROOT / "reports" / "bench" / "preference.json"
TASK_METRICS = ("json_field_accuracy", "json_valid", "exact_match")


def clone(work: Path) -> Path:
    """The project as committed, its outputs checked out from this project's DVC cache."""
    project = work / "project"
    run(["git", "clone", "-q", str(ROOT), str(project)], work)
    if (ROOT.parent / "shared").exists():  # params.yaml names the standard benchmarks' files as ../shared/...
        os.symlink(ROOT.parent / "shared", work / "shared")
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "cache", "dir", "--local", str(ROOT / ".dvc" / "cache")], project)
    run([*dvc, "config", "--local", "cache.type", "symlink"], project)
    run([*dvc, "checkout", "-q", "base", "prepare", "train"], project)
    os.symlink(ROOT / ".venv", project / ".venv")
    return project


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def tune(project: Path, settings: dict) -> tuple[str, float]:
    """README's documented run, up to evaluate_merged: `ftq run --exp -S preference.<key>=<value> ...`."""
    overrides = [arg for key, value in settings.items() for arg in ("-S", f"preference.{key}={value}")]
    started = time.time()
    log = run([sys.executable, "-m", "ftq", "run", "--exp", *overrides, "--name", "dpo", "evaluate_merged"], project)
    # prepare may run again (its deps include data/raw, where the pairs live) and make the same data; train
    # must not: measure() checks that the SFT adapter is the demo's, byte for byte
    for stage in ("base", "train"):
        if f"Stage '{stage}' didn't change, skipping" not in log:
            raise SystemExit(f"stage {stage} ran again in the clone: the DPO run would not start from the demo's SFT"
                             f"\n{log[-3000:]}")
    return log, time.time() - started


def task_comparison(sft: Path, dpo: Path) -> dict:
    from ftq import evidence
    from ftq.promotion.candidates import load_scores

    a, b = load_scores(dpo), load_scores(sft)
    out = {}
    for metric in TASK_METRICS:
        if not any(metric in row for row in a.values()):
            continue
        # the examples that carry the metric (json_* only on the orders whose reference is JSON)
        mine, theirs = evidence.pair(a, b, metric, f"{dpo} vs {sft}")
        out[metric] = {"dpo": round(sum(mine) / len(mine), 4), "sft": round(sum(theirs) / len(theirs), 4),
                       "dpo_minus_sft": evidence.difference(mine, theirs)}
    return out


def benchmark_comparison(sft: Path, dpo: Path) -> dict:
    from ftq.evaluation import benchmark_scores

    def rows(path):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    mine, theirs = rows(dpo), rows(sft)
    out = {}
    for task in sorted({r["task"] for r in mine}):
        for metric in ("acc", "acc_norm"):
            where = f"{task} {metric}"
            m, t = benchmark_scores.per_item(mine, task, metric), benchmark_scores.per_item(theirs, task, metric)
            out[f"{task}.{metric}"] = {"dpo": round(sum(m.values()) / len(m), 4), "sft": round(sum(t.values()) / len(t), 4),
                                        "dpo_minus_sft": benchmark_scores.vs_merged(m, t, 0.95, where)}
    return out


def measure(settings: dict) -> dict:
    import yaml

    from ftq import schema

    with tempfile.TemporaryDirectory(prefix="ftq-bench-preference-") as tmp:
        project = clone(Path(tmp))
        log, seconds = tune(project, settings)
        stage = json.loads((project / "reports" / "preference.json").read_text())
        evaluation = {k: v for k, v in json.loads((project / "reports/eval/merged.json").read_text()).items()
                      if isinstance(v, (int, float))}
        result = {
            "settings": settings,
            "pipeline_seconds": round(seconds, 1),
            "stage": {k: stage[k] for k in ("objective", "start_from", "method", "train_records", "steps", "first_loss",
                                            "final_loss", "train_step_seconds", "wall_seconds", "precision", "held_out")},
            "task": task_comparison(ROOT / "reports/eval/merged.answers.jsonl", project / "reports/eval/merged.answers.jsonl"),
            "general": benchmark_comparison(ROOT / "reports/eval/lm_eval/merged.samples.jsonl",
                                            project / "reports/eval/lm_eval/merged.samples.jsonl"),
            "dpo_merged_eval": evaluation,
            "general_guard": schema.settings(yaml.safe_load((ROOT / "params.yaml").read_text()), "promote")[
                "policy"]["general_guard"],
            "sft_adapter_sha": _sha(ROOT / "models/adapter/adapter_model.safetensors"),
            "dpo_run_sft_adapter_sha": _sha(project / "models/adapter/adapter_model.safetensors"),
        }
        # the DPO model's answers beside the report, for a reader to pair with reports/eval/merged.answers.jsonl
        shutil.copy(project / "reports/eval/merged.answers.jsonl", OUT.with_suffix(".answers.jsonl"))
        if result["sft_adapter_sha"] != result["dpo_run_sft_adapter_sha"]:
            raise SystemExit("the clone's SFT adapter differs from the demo's: the comparison would not be paired")
        shutil.rmtree(project / ".venv", ignore_errors=True)
    return result


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def table(report: dict) -> str:
    held = report["stage"]["held_out"]
    lines = ["| measured on held-out data | SFT (the demo's merged) | after DPO | DPO − SFT, 95 % paired interval |",
             "|---|---|---|---|"]
    ref, new = held["reference_logp_accuracy"], held["logp_accuracy"]
    diff = held["logp_accuracy_vs_reference"]
    lines.append(f"| preference pairs: chosen more likely ({held['pairs']} pairs) | {ref['mean']:.3f} | {new['mean']:.3f} | "
                 f"{diff['diff']:+.3f} [{diff['interval'][0]:+.3f}, {diff['interval'][1]:+.3f}] |")
    pref = held["pref_accuracy"]
    lines.append(f"| pref_accuracy (implicit reward ranks chosen higher) | 0.5 by definition | {pref['mean']:.3f} | "
                 f"interval of the DPO model's own share: [{pref['interval'][0]:.3f}, {pref['interval'][1]:.3f}] |")
    for metric, row in report["task"].items():
        d = row["dpo_minus_sft"]
        lines.append(f"| task {metric} ({d['examples']} orders) | {row['sft']:.4f} | {row['dpo']:.4f} | "
                     f"{d['diff']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] |")
    for metric, row in report["general"].items():
        d = row["dpo_minus_sft"]
        lines.append(f"| {metric} ({d['examples']} items) | {row['sft']:.4f} | {row['dpo']:.4f} | "
                     f"{d['diff']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] |")
    s = report["stage"]
    lines += ["", f"DPO ({s['method']}, from {s['start_from']}): {s['steps']} steps on {s['train_records']} pairs, "
              f"loss {report['settings'].get('loss_type', 'sigmoid')}, learning rate {report['settings'].get('learning_rate')}, "
              f"beta {report['settings'].get('beta', 0.1)}; "
              f"{s['train_step_seconds']:.0f} s of training steps"
              + (f", {report['pipeline_seconds']:.0f} s for preference, merge and evaluate_merged."
                 if report.get("pipeline_seconds") else ".")]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print README's table from the committed report")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="[sigmoid,sft]", help="preference.loss_type, as -S takes it")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch over the pairs")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    report = measure({"objective": "dpo", "loss_type": args.loss_type, "learning_rate": args.learning_rate,
                      "beta": args.beta, "max_steps": args.max_steps})
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(OUT, stamp(report, script=__file__))
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
