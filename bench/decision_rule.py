"""The promotion rule's error rates by simulation, the new rule beside the old one (issue 41), on the same draws.

New (ftq.promotion.policy, ftq.evidence): fixed-sequence testing from the largest build down; a build is
faithful when non-inferiority at promote.policy.margin is shown on the task metric (BCa bootstrap; exact
for 0/1 scores) and on the HellaSwag guard at its tolerance (exact); the smallest faithful build ships.
Old (the rule before, re-implemented here as it was, for comparison only): builds from the smallest up; a
build is "tied" with merged when the upper end of a 95 % percentile-bootstrap interval of its paired
difference reaches 0; the guard rejects only when the interval lies wholly below -0.02; the first tied
build that the guard does not reject ships.

The data (ftq.promotion.simulation): the demo's field accuracy on its held-out examples (40 before this
issue, 80 now) and HellaSwag acc_norm on 300 items, merged's scores drawn from the demo's distributions.
Ladders of three rungs, largest first: q8_0 (almost no example differs), q4 (the scenario's truth), q3 (the
same truth). Writes reports/bench/decision_rule.json; docs/benchmarks.md's table is generated from it:

    .venv/bin/python bench/decision_rule.py [--repeats 1000]
    .venv/bin/python bench/decision_rule.py --table
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "bench" / "decision_rule.json"
OLD_TOLERANCE = 0.02


def old_interval(d: np.ndarray, seed: int = 0, resamples: int = 4000) -> tuple[float, float]:
    """The old rule's interval: a 95 % percentile bootstrap of the mean paired difference."""
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def old_decision(rng, ladder, policy) -> str | None:
    """The old rule on one draw: smallest first, the first build 'tied' (interval reaching 0) that the
    old guard (interval wholly below -0.02 rejects) lets through."""
    from ftq.promotion import simulation as sim

    merged_task, merged_guard = sim.draw_merged_task(rng), sim.draw_merged_guard(rng)
    guard_values, guard_shares = np.array([1.0, 0.0]), np.array([sim.GUARD_RIGHT, 1 - sim.GUARD_RIGHT])
    builds = {name: (sim.draw_build(rng, merged_task, task, sim.FIELD_VALUES, sim.FIELD_SHARES),
                     sim.draw_build(rng, merged_guard, guard, guard_values, guard_shares)) for name, task, guard in ladder}
    for name, _, _ in reversed(ladder):  # smallest first
        task, guard = builds[name]
        if old_interval(task - merged_task)[1] >= 0 and old_interval(guard - merged_guard)[1] >= -OLD_TOLERANCE:
            return name
    return None


def scenarios(margin: float, tolerance: float):
    """Ladders of q8_0 (almost no example differs), then q4 and q3 with the truth named (largest first)."""
    from ftq.promotion.simulation import Truth

    near = (Truth(0.02), Truth(0.01))
    truths = {
        "equal": (Truth(0.15), Truth(0.06)),
        "worse by the margin (task)": (Truth(0.15, margin), Truth(0.06)),
        "worse by twice the margin (task)": (Truth(0.15, 2 * margin), Truth(0.06)),
        "rare failures, twice the margin (task)": (Truth(0.15, 2 * margin, "fail"), Truth(0.06)),
        "worse by the tolerance (guard)": (Truth(0.15), Truth(0.06, tolerance)),
        "worse by twice the tolerance (guard)": (Truth(0.15), Truth(0.06, 2 * tolerance)),
    }
    return {name: [("q8_0", *near), ("q4", *truth), ("q3", *truth)] for name, truth in truths.items()}


def measure(repeats: int) -> dict:
    from ftq import schema
    from ftq.promotion import simulation as sim

    policy = schema.defaults("promote")["policy"]
    margin, tolerance = policy["margin"], policy["general_guard"]["tolerance"]
    rows = []
    for examples in (40, sim.TASK_EXAMPLES):
        sim.TASK_EXAMPLES = examples
        for name, ladder in scenarios(margin, tolerance).items():
            started = time.time()
            new = sim.rates(ladder, policy, repeats=repeats, seed=7)
            rng = np.random.default_rng(7)
            old_counts: dict = {}
            for _ in range(repeats):
                pick = old_decision(rng, ladder, policy)
                old_counts[pick] = old_counts.get(pick, 0) + 1
            old = {k: v / repeats for k, v in old_counts.items()}
            rows.append({"examples": examples, "scenario": name,
                         "new": {"q4_or_q3_shipped": round(new.get("q4", 0) + new.get("q3", 0), 4),
                                 "q8_0_shipped": round(new.get("q8_0", 0), 4), "none": round(new.get(None, 0), 4)},
                         "old": {"q4_or_q3_shipped": round(old.get("q4", 0) + old.get("q3", 0), 4),
                                 "q8_0_shipped": round(old.get("q8_0", 0), 4), "none": round(old.get(None, 0), 4)},
                         "seconds": round(time.time() - started, 1)})
            print(rows[-1], flush=True)
    return {"repeats": repeats, "margin": margin, "guard_tolerance": tolerance, "old_guard_tolerance": OLD_TOLERANCE,
            "confidence": policy["confidence"], "guard_items": sim.GUARD_ITEMS, "rows": rows}


def table(report: dict) -> str:
    lines = ["| held-out examples | truth of q4 and q3 | new rule: ships q4 or q3 | old rule: ships q4 or q3 |",
             "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['examples']} | {r['scenario']} | {r['new']['q4_or_q3_shipped']:.1%} | "
                     f"{r['old']['q4_or_q3_shipped']:.1%} |")
    lines += ["", f"{report['repeats']} simulated ladders per row (q8_0, then q4 and q3 with the truth named), "
                  f"margin {report['margin']:g}, guard tolerance {report['guard_tolerance']:g} on "
                  f"{report['guard_items']} HellaSwag items (the old guard's: {report['old_guard_tolerance']:g}), "
                  f"{report['confidence']:.0%} confidence. 'equal': the share is the power; every other row: the "
                  "share is the rate of shipping a build that is truly worse."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--table", action="store_true", help="print the docs table from the report")
    args = parser.parse_args(argv)
    import json

    from ftq.io import atomic_write_json

    if args.table:
        print(table(json.loads(REPORT.read_text())))
        return 0
    from ftq.provenance import stamp

    report = stamp(measure(args.repeats), script=__file__)
    atomic_write_json(REPORT, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
