"""Stage `ladder`: the builds of quantize.enabled, screened, then tested for faithfulness with one error budget.

Every build has passed or failed its screen in stage quantize (KL divergence and top-1 agreement against
merged's reference, a coherent reply: ftq.quantize.check). A build that failed is recorded here and never
evaluated. The rule (ftq.promotion.policy, statistics from ftq.evidence):

* `promote.policy.select: smallest_faithful` (the default): fixed-sequence testing. The screened builds are
  ordered before any is evaluated, largest first; each in turn is answered on the held-out examples (the
  policy's metric alone: seconds) and tested for non-inferiority against merged at the policy's margin,
  then, where that shows it faithful, scored on the lm-eval tasks and tested on the general-ability guard
  at its tolerance. The walk stops at the first build not shown faithful on both; the last one shown
  faithful (the smallest so far) is the pick and is evaluated in full (perplexity, speed, ...), reusing
  the answers and lm-eval rows the walk decided on. Shipping an unfaithful build then has probability at
  most 1 - confidence, however many builds the ladder holds.
* `select: best`: every screened build is evaluated in full; promote applies Holm's procedure.

Outputs (ftq.layout):
  reports/eval/builds/   each tested build's answers (<name>.quick.jsonl) and lm-eval rows, and the full
                         evaluation of the pick (as stage evaluate writes merged's)
  reports/ladder.json    every rung (type, importance matrix, size, KLD, top-1, screen) and the walk: the
                         procedure, the order, each test (margin, one-sided bound, p-value, outcome,
                         examples) and where it stopped
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftq import layout, schema
from ftq.io import atomic_write_json
from ftq.params import repo_root
from ftq.provenance import stamp

if TYPE_CHECKING:
    from ftq.promotion.policy import Candidate

log = logging.getLogger(__name__)

REPORT = layout.LADDER


def rung(root: Path, name: str) -> dict:
    """One build as stage quantize left it: its report (size, distances, screen) and options."""
    report_path = root / layout.QUANTIZE_REPORTS / f"{name}.json"
    manifest_path = root / layout.QUANTIZED / name / "manifest.json"
    if not report_path.exists() or not manifest_path.exists():
        raise FileNotFoundError(f"{report_path}: build '{name}' is not made; run `dvc repro quantize@{name}` first")
    report, manifest = json.loads(report_path.read_text()), json.loads(manifest_path.read_text())
    return {"name": name, "method": report["method"], "type": manifest["options"].get("type"),
            "imatrix": manifest.get("imatrix") is not None, "size_bytes": report["size_bytes"],
            "kld_mean": report["kld_mean"], "kld_p99": report["kld_p99"], "top1_agreement": report["top1_agreement"],
            "screen_passed": bool(report["check_passed"]), "screen_failures": report.get("check_failures") or [],
            "evaluated": False}


class Tester:
    """A build's test in the walk (the I/O: answers, lm-eval), remembering what it scored so that the full
    evaluation of the pick reuses it."""

    def __init__(self, params: dict, root: Path, merged: Candidate, policy: dict):
        self.params, self.root, self.merged, self.policy = params, root, merged, policy
        self.rows: dict[str, dict[str, list[dict]]] = {}  # by build, its rows by kind
        self.lm_eval: dict[str, dict] = {}

    def __call__(self, name: str) -> dict:
        from ftq.evaluation.candidate import lm_eval_rows, metric_kind, metric_rows
        from ftq.io import atomic_write_text
        from ftq.promotion.policy import guard_test, metric_test, outcome_of, p_value_of

        rows = metric_rows(self.params, name, self.policy["metric"])
        atomic_write_text(self.root / layout.BUILDS_ROOT / f"{name}.quick.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.rows[name] = {metric_kind(self.policy["metric"]): rows}
        metric = metric_test({r["id"]: r for r in rows}, self.merged.scores, self.policy, f"{name} vs merged")
        guard = None
        if metric["outcome"] == "faithful" and self.policy["general_guard"]["task"]:
            self.lm_eval[name], samples = lm_eval_rows(self.params, name)
            guard = guard_test(samples, self.merged, self.policy, name)
        # p_value: the intersection-union p-value (where the guard did not run, the metric's alone: a lower bound)
        return {"outcome": outcome_of(metric, guard), "p_value": p_value_of(metric, guard), "metric_test": metric,
                "general_guard": guard}


def walk(rungs: list[dict], test, policy: dict) -> dict:
    """The walk over the rungs that passed their screen (smallest_faithful): fixed-sequence testing in
    walk_order; `test(name)` is the caller's I/O ({outcome, ...}), so the walk tests without models.
    Returns {procedure, order, tests, stopped_at, pick}."""
    from ftq import evidence
    from ftq.promotion.policy import FIXED_SEQUENCE, walk_order

    order = walk_order([r for r in rungs if r["screen_passed"]])
    tests, pick = evidence.fixed_sequence(order, test)
    stopped = tests[-1]["name"] if tests and tests[-1]["outcome"] != evidence.FAITHFUL else None
    return {"procedure": FIXED_SEQUENCE, "order": order, "tests": tests, "stopped_at": stopped, "pick": pick}


def tested_in_full(root: Path, name: str, merged: Candidate, policy: dict) -> dict:
    """select best: a build's tests from its full evaluation (each at the full level; promote shares the
    error budget among them by Holm's procedure)."""
    from ftq.promotion.candidates import read_candidate
    from ftq.promotion.policy import guard_test, metric_test, outcome_of, p_value_of

    candidate = read_candidate(root, name, policy["metric"])
    metric = metric_test(candidate.scores, merged.scores, policy, f"{name} vs merged")
    guard = guard_test(candidate.benchmark_rows, merged, policy, name)
    return {"outcome": outcome_of(metric, guard), "p_value": p_value_of(metric, guard), "metric_test": metric,
            "general_guard": guard}


def annotate(rungs: list[dict], walked: dict | None) -> list[dict]:
    """Each rung's part in the walk: its test, or why it was not tested."""
    tests = {t["name"]: t for t in (walked or {}).get("tests", [])}
    for r in rungs:
        if not r["screen_passed"]:
            r["why"] = "failed its screen: " + "; ".join(r["screen_failures"])
        elif walked is not None and r["name"] in tests:
            r["test"] = {k: v for k, v in tests[r["name"]].items() if k != "name"}
        elif walked is not None:
            r["why"] = f"not tested: the walk stopped at {walked['stopped_at']}, a larger build not shown faithful"
    return rungs


def run(params: dict[str, Any]) -> dict[str, Any]:
    from ftq.evaluation.candidate import evaluate
    from ftq.promotion.candidates import read_merged
    from ftq.promotion.policy import policy_of

    root = repo_root()
    policy = policy_of(params)
    names = schema.settings(params, "quantize")["enabled"]
    merged = read_merged(root, policy["metric"])
    if merged is None or merged.scores is None:
        raise FileNotFoundError(f"{root / layout.EVAL_ROOT / 'merged.json'}: merged is not evaluated; every "
                                "build is measured against it (`dvc repro evaluate_merged` first)")
    rungs = [rung(root, name) for name in names]
    builds = root / layout.BUILDS_ROOT
    shutil.rmtree(builds, ignore_errors=True)  # an earlier walk's evaluations (DVC removes them too)
    builds.mkdir(parents=True)

    def full(name: str, tester: Tester | None = None) -> None:
        evaluate(params, name, scored=tester.rows.get(name) if tester else None,
                 lm_eval_done=tester.lm_eval.get(name) if tester else None)

    import time

    started, walked = time.time(), None
    if policy["select"] == "smallest_faithful":
        tester = Tester(params, root, merged, policy)
        walked = walk(rungs, tester, policy)
        if walked["pick"] is not None:
            full(walked["pick"], tester)
    else:
        for r in rungs:
            if r["screen_passed"]:
                full(r["name"])
                r["test"] = tested_in_full(root, r["name"], merged, policy)
    for r in rungs:
        r["evaluated"] = (root / layout.BUILDS_ROOT / f"{r['name']}.json").exists()
    report = {"select": policy["select"], "metric": policy["metric"], "margin": policy["margin"],
              "margin_scale": policy["margin_scale"], "confidence": policy["confidence"],
              "general_guard": policy["general_guard"],
              "merged_metric": merged.metrics.get(policy["metric"]),
              "merged_metric_examples": merged.metrics.get(f"{policy['metric']}_examples"),
              "merged_size_bytes": merged.metrics.get("size_bytes"),
              "walk": ({k: v for k, v in walked.items() if k != "tests"} if walked else
                       {"procedure": "select best: every screened build evaluated; Holm's procedure in promote"}),
              "evaluated": [r["name"] for r in rungs if r["evaluated"]],
              "seconds": round(time.time() - started, 1),  # the walk's tests and the pick's full evaluation
              "rungs": sorted(annotate(rungs, walked), key=lambda r: (r["size_bytes"], r["name"]))}
    report = stamp(report)
    atomic_write_json(root / REPORT, report)
    for r in report["rungs"]:
        test = r.get("test")
        state = (f"{test['outcome']} (p = {test['p_value']})" if test and test.get("p_value") is not None
                 else test["outcome"] if test else r["why"] if "why" in r else "evaluated")
        log.info("%s (%s, %s bytes, KLD %.4f): %s", r["name"], r["type"] or r["method"], f"{r['size_bytes']:,}",
                 r["kld_mean"], state)
    log.info("pick: %s", (walked or {}).get("pick"))
    return report
