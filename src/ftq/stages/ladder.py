"""Stage `ladder`: the builds of quantize.enabled, screened, then evaluated from the smallest up.

Every build has passed or failed its screen in stage quantize (KL divergence and top-1 agreement against
merged's reference, a coherent reply: ftq.quantize.check). A build that failed is recorded here and never
evaluated. The builds that passed are taken in order of size, smallest first. With `promote.policy.select:
smallest_tied` each is first scored on the policy's metric alone (its held-out answers: seconds), paired
with merged; one that is not tied with merged there cannot be the smallest tied build and needs no full
evaluation. The first one tied is evaluated in full (stage evaluate's measurement, ftq.stages.evaluate:
the general-ability benchmark, perplexity, speed), and if it passes the policy (ftq.selection) the walk
stops: the larger builds need no evaluation at all. With `select: best` every build that passed its
screen is evaluated in full.

Outputs:
  reports/eval/builds/   each evaluated build's reports (as stage evaluate writes them for merged), and
                         <name>.quick.jsonl: a build's rows on the metric alone
  reports/ladder.json    every rung: type, importance matrix, size, KLD, top-1, screen, evaluated or why
                         not, the metric with its interval, the paired difference from merged, the verdict
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftq import schema
from ftq.io import atomic_write_json
from ftq.params import repo_root

if TYPE_CHECKING:
    from ftq.promotion.policy import Candidate

log = logging.getLogger(__name__)

REPORT = Path("reports/ladder.json")


def rung(root: Path, name: str) -> dict:
    """One build as stage quantize left it: its report (size, distances, screen) and options."""
    report_path = root / "reports" / "quantize" / f"{name}.json"
    manifest_path = root / "models" / "quantized" / name / "manifest.json"
    if not report_path.exists() or not manifest_path.exists():
        raise FileNotFoundError(f"{report_path}: build '{name}' is not made; run `dvc repro quantize@{name}` first")
    report, manifest = json.loads(report_path.read_text()), json.loads(manifest_path.read_text())
    return {"name": name, "method": report["method"], "type": manifest["options"].get("type"),
            "imatrix": manifest.get("imatrix") is not None, "size_bytes": report["size_bytes"],
            "kld_mean": report["kld_mean"], "kld_p99": report["kld_p99"], "top1_agreement": report["top1_agreement"],
            "screen_passed": bool(report["check_passed"]), "screen_failures": report.get("check_failures") or [],
            "evaluated": False}


def verdict(root: Path, name: str, merged: Candidate, policy: dict) -> dict:
    """An evaluated build against the policy: its metric, the paired difference from merged, whether it
    passes the policy (ftq.promotion.policy's judge) and is tied with merged."""
    from ftq.promotion.candidates import read_candidate
    from ftq.promotion.policy import judge
    from ftq.selection import vs_merged

    candidate = read_candidate(root, name, policy["metric"])
    judged = judge(candidate, merged, policy)
    metrics = candidate.metrics or {}
    d = vs_merged(candidate.scored(), merged.scored(), policy) if candidate.scores is not None and merged.scores else None
    return {"metric": metrics.get(policy["metric"]), "metric_ci95": metrics.get(f"{policy['metric']}_ci95"),
            "vs_merged": {k: d[k] for k in ("diff", "interval", "examples")} if d else None,
            "tied": bool(d and d["tied"]), "eligible": judged.passes, "reasons": judged.reasons,
            "general_guard": judged.general_guard}


def quick(params: dict, root: Path, name: str, merged: Candidate, policy: dict, first_looks: dict) -> dict:
    """A build scored on the policy's metric alone (ftq.stages.evaluate.metric_rows: its answers to the
    held-out examples, or the held-out pairs), paired with merged's: the metric and its difference from
    merged, with intervals. The rows go to reports/eval/builds/<name>.quick.jsonl and to `first_looks`, so
    that a full evaluation reuses them: the verdicts on the metric alone and in full rest on the same answers."""
    from ftq.evaluation import paired
    from ftq.io import atomic_write_text
    from ftq.selection import per_example_key, vs_merged
    from ftq.stages.evaluate import BUILDS_ROOT, metric_rows

    rows = metric_rows(params, name, policy["metric"])
    atomic_write_text(root / BUILDS_ROOT / f"{name}.quick.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    first_looks[name] = rows
    key = per_example_key(policy["metric"])
    values = [r[key] for r in rows if key in r]
    d = vs_merged({"name": name, "scores": {r["id"]: r for r in rows}}, merged.scored(), policy)
    return {"metric": round(sum(values) / len(values), 4) if values else None,
            "metric_ci95": paired.mean(values, float(policy["confidence"]))["interval"] if values else None,
            "diff": d["diff"], "interval": d["interval"], "tied": d["tied"]}


def walk(rungs: list[dict], quick, full, select: str) -> list[dict]:
    """The ladder's walk over the rungs that passed their screen, smallest first. `quick(name)` scores a
    build on the policy's metric alone (its held-out answers, seconds) and returns {tied, ...}; `full(name)`
    evaluates it in full and returns promote's verdict {eligible, tied, ...}. Both are the caller's I/O, so
    the walk tests without models.

    smallest_tied: a build not tied with merged on the metric needs no full evaluation (it cannot be the
    smallest tied one); the first build tied on the metric is evaluated in full, and if it passes the
    policy the walk stops. When none is tied, the best on the metric is evaluated in full, so promote can
    rank it. best: every build is evaluated in full. Every rung gets `evaluated`, `quick` where it was
    scored, and `why` where it was not evaluated in full."""
    from ftq.selection import by_size

    ordered = by_size([r for r in rungs if r["screen_passed"]])
    stop = None
    for r in ordered:
        if stop is not None:
            r["why"] = f"not evaluated: {stop}, a smaller build, is tied with merged"
            continue
        if select == "smallest_tied":
            r["quick"] = quick(r["name"])
            if not r["quick"]["tied"]:
                r["why"] = "not evaluated in full: not tied with merged on the metric"
                continue
        r.update(evaluated=True, **full(r["name"]))
        if select == "smallest_tied" and r["eligible"] and r["tied"]:
            stop = r["name"]
    if select == "smallest_tied" and stop is None:
        # none tied and eligible: the best on the metric, evaluated in full for promote to rank (unless a build
        # evaluated in full already is at least as good)
        scored = [r for r in ordered if "quick" in r]
        if scored:
            best = max(scored, key=lambda r: (r["quick"]["diff"], -r["size_bytes"]))
            if not best["evaluated"]:
                best.pop("why", None)
                best.update(evaluated=True, **full(best["name"]))
    for r in rungs:
        if not r["screen_passed"]:
            r["why"] = "failed its screen: " + "; ".join(r["screen_failures"])
    return rungs


def run(params: dict[str, Any]) -> dict[str, Any]:
    from ftq.stages import evaluate
    from ftq.promotion.candidates import read_merged
    from ftq.promotion.policy import policy_of

    root = repo_root()
    policy = policy_of(params)
    names = schema.settings(params, "quantize")["enabled"]
    merged = read_merged(root, policy["metric"])
    if merged is None:
        raise FileNotFoundError(f"{root / evaluate.REPORT_ROOT / 'merged.json'}: merged is not evaluated; every "
                                "build is measured against it (`dvc repro evaluate_merged` first)")
    rungs = [rung(root, name) for name in names]
    builds = root / evaluate.BUILDS_ROOT
    shutil.rmtree(builds, ignore_errors=True)  # an earlier walk's evaluations (DVC removes them too)
    builds.mkdir(parents=True)
    first_looks: dict[str, list[dict]] = {}

    def full(name: str) -> dict:
        from ftq.selection import PREFERENCE_KEYS

        rows = first_looks.get(name)
        on_pairs = policy["metric"] in PREFERENCE_KEYS
        evaluate.run(params, name, task_rows=None if on_pairs else rows, preference_scores=rows if on_pairs else None)
        return verdict(root, name, merged, policy)

    rungs = walk(rungs, lambda name: quick(params, root, name, merged, policy, first_looks), full, policy["select"])
    report = {"select": policy["select"], "metric": policy["metric"], "confidence": policy["confidence"],
              "merged_metric": merged.metrics.get(policy["metric"]),
              "merged_size_bytes": merged.metrics.get("size_bytes"),
              "evaluated": [r["name"] for r in rungs if r["evaluated"]],
              "rungs": sorted(rungs, key=lambda r: (r["size_bytes"], r["name"]))}
    atomic_write_json(root / REPORT, report)
    for r in report["rungs"]:
        state = "evaluated" if r["evaluated"] else r["why"]
        tied = f", tied with merged: {r['tied']}" if r["evaluated"] else ""
        log.info("%s (%s, %s bytes, KLD %.4f): %s%s", r["name"], r["type"] or r["method"], f"{r['size_bytes']:,}",
                 r["kld_mean"], state, tied)
    return report
