"""Which build to ship: pure decisions on per-example scores (no MLflow, no files), shared by stage
`ladder` (which builds to evaluate) and stage `promote` (which one becomes champion).

The rule `promote.policy.select: smallest_tied` (the default) ships the smallest faithful build:
  * a build is *tied with merged* when the paired interval of its difference from merged on the policy's
    metric reaches 0 (it is not shown worse than merged at the policy's confidence), and it passes the
    policy's other checks (retention, the general-ability guard, the size cap);
  * walking the builds from the smallest up, the first one tied with merged is the pick; a larger build
    replaces it only when it is significantly better (interval above 0) than every smaller eligible build;
  * when no build is tied with merged, the best by the metric is the pick (`best`'s rule).
So the ladder can stop evaluating at the first tied build: a larger one could only win by beating it
significantly, and a build tied with merged leaves little room above it. `select: best` evaluates every
build and ranks them by the metric, size and speed breaking ties (ftq.promotion.policy's `rank`).

A candidate here is a dict with `name`, `scores` (per example id, the rows of reports/eval/...answers.jsonl)
and `size_bytes`; `merged` likewise (ftq.promotion.policy.Candidate.scored() gives this view of a build).
"""

from __future__ import annotations

from ftq.evaluation import paired

SELECT = ("smallest_tied", "best")
# promote.policy.metric -> the per-example key of its rows (preference metrics score held-out pairs)
PREFERENCE_KEYS = {"pref_accuracy": "pref_accuracy", "pref_logp_accuracy": "logp_accuracy"}


def per_example_key(metric: str) -> str:
    return PREFERENCE_KEYS.get(metric) or metric[len("task_"):]


def difference(mine: dict[str, dict], theirs: dict[str, dict], policy: dict, where: str) -> dict:
    """Per-example scores `mine` minus `theirs` on the policy's metric, signed so that > 0 means mine is
    better, with its paired interval ({diff, interval, examples}); `where` names the pair in errors."""
    key = per_example_key(policy["metric"])
    a, b = paired.pair(mine, theirs, key, where)
    if policy["direction"] == "min":
        a, b = b, a
    return paired.difference(a, b, float(policy["confidence"]))


def compare(a: dict, b: dict, policy: dict, where: str) -> dict:
    """Candidate a minus candidate b (see `difference`)."""
    return difference(a["scores"], b["scores"], policy, where)


def vs_merged(candidate: dict, merged: dict, policy: dict) -> dict:
    """The candidate minus merged with its interval, and `tied`: the interval reaches 0 (not shown worse)."""
    d = compare(candidate, merged, policy, f"{candidate['name']} vs merged")
    return {**d, "tied": d["interval"][1] >= 0}


def by_size(candidates: list[dict]) -> list[dict]:
    """Smallest first (name breaks equal sizes, so the order is stable)."""
    return sorted(candidates, key=lambda c: (c["size_bytes"], c["name"]))


def smallest_tied(eligible: list[dict], merged: dict, policy: dict) -> tuple[dict | None, str]:
    """The pick among builds that pass the policy (see the module's rule) and why; (None, why) when there
    is no eligible build or none is tied with merged (the caller then ranks by the metric)."""
    if not eligible:
        return None, "no build passes the policy"
    level = f"{float(policy['confidence']):.0%}"
    pick, why, smaller = None, "", []
    for candidate in by_size(eligible):
        if pick is None:
            d = vs_merged(candidate, merged, policy)
            if d["tied"]:
                pick = candidate
                why = (f"the smallest build tied with merged: {policy['metric']} {d['diff']:+.4f} vs merged "
                       f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] at {level}")
        elif all(compare(candidate, s, policy, f"{candidate['name']} vs {s['name']}")["interval"][0] > 0 for s in smaller):
            pick = candidate
            why = f"significantly better than every smaller build at {level} ({', '.join(s['name'] for s in smaller)})"
        smaller.append(candidate)
    if pick is None:
        return None, f"no build is tied with merged at {level}"
    return pick, why
