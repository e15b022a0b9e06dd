"""The promotion rule's error rates, by simulation: per-example scores drawn for a ladder of builds whose
true difference from merged is known, and the whole decision made on them as the pipeline makes it (the
ladder's fixed-sequence walk, each rung tested on the policy's metric and on the general-ability guard by
ftq.promotion.policy, the pick shipped). Pure and seeded; used by tests/promotion/test_simulation.py
(which asserts the error rates) and bench/decision_rule.py (which reports them beside the old rule's).

The data mimic the demo's: `task_json_field_accuracy` on 80 held-out examples (merged's per-example scores
drawn from its observed distribution: 1.0, 0.75, 0.5, 0.25 with shares 14, 19, 5, 2 of 40) and HellaSwag
acc_norm on 200 items (merged right on GUARD_RIGHT of them).

How a build differs from merged:
* `Truth(noise)`: each example differs from merged's with probability `noise`, with a true difference of
  exactly 0: a graded score moves one step up or down (the two balanced so that the mean move is 0), a 0/1
  item is scored afresh from merged's own distribution (exchangeable). A q4_k_m-like build: 0.15 on the
  metric (the demo's q4_k_m differed from merged on 6 of 40 orders, by one step each) and 0.06 on the
  guard (8 of 300 HellaSwag items differed).
* `Truth(noise, delta)`: on top of that noise, each example loses one step (0.25 of the field accuracy,
  or a right HellaSwag answer becoming wrong) with the probability that makes the true difference -delta.
* `Truth(noise, delta, "fail")`: rare total failures instead (an answer scoring 0), again to -delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIELD_VALUES = np.array([1.0, 0.75, 0.5, 0.25])
FIELD_SHARES = np.array([14, 19, 5, 2]) / 40
GUARD_RIGHT = 0.39
TASK_EXAMPLES, GUARD_ITEMS = 80, 200


@dataclass(frozen=True)
class Truth:
    """How one build truly differs from merged on one measure."""
    noise: float = 0.0      # share of examples scored afresh (exchangeable: no true difference)
    delta: float = 0.0      # the true loss (merged - build), reached by `kind`
    kind: str = "step"      # step: one step lost at a time | fail: the whole score lost, rarely


def draw_merged_task(rng, n: int | None = None) -> np.ndarray:
    return rng.choice(FIELD_VALUES, size=n or TASK_EXAMPLES, p=FIELD_SHARES)


def draw_merged_guard(rng, n: int | None = None) -> np.ndarray:
    return (rng.random(n or GUARD_ITEMS) < GUARD_RIGHT).astype(float)


def draw_build(rng, merged: np.ndarray, truth: Truth, values: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """A build's scores on merged's examples, merged's per-example scores being distributed as `values`
    with `shares`."""
    build = merged.copy()
    moved = rng.random(len(build)) < truth.noise
    if len(values) == 2:  # 0/1 scores: the moved items are scored afresh (exchangeable with merged)
        build[moved] = rng.choice(values, size=int(moved.sum()), p=shares)
    else:  # graded scores: a moved example is one step up or down, the two balanced to a mean move of 0
        step = float(values[values > 0].min())
        top, bottom = values.max(), values.min()
        interior = shares[(values != top) & (values != bottom)].sum()
        up_share = (shares[values == top].sum() - shares[values == bottom].sum() + interior) / (2 * interior)
        up = np.where(build == bottom, True, np.where(build == top, False, rng.random(len(build)) < up_share))
        build[moved] += np.where(up[moved], step, -step)
    if truth.delta > 0:
        if truth.kind == "fail":  # a failure scores 0: its chance times merged's mean is delta
            build[rng.random(len(build)) < truth.delta / float(values @ shares)] = 0.0
        else:  # one step lost where there is one to lose: its chance times the step times that share is delta
            step = float(values[values > 0].min())
            has_step = float(shares[values >= step].sum())
            build[(rng.random(len(build)) < truth.delta / (step * has_step)) & (build >= step)] -= step
    return build


def rows(values: np.ndarray, key: str) -> dict[str, dict]:
    return {str(i): {key: float(v)} for i, v in enumerate(values)}


def lm_eval_rows(values: np.ndarray, task: str, metric: str) -> list[dict]:
    return [{"task": task, "doc_id": i, metric: float(v)} for i, v in enumerate(values)]


def decide_once(rng, ladder: list[tuple[str, Truth, Truth]], policy: dict, resamples: int = 999) -> str | None:
    """One draw of merged and of every build (name, task truth, guard truth; listed largest first, and
    given sizes in that order), then the pipeline's decision on it, with the policy's own functions: the
    walk's order (walk_order), fixed-sequence testing, the metric's test (metric_test) and the guard's
    (guard_test), each build faithful only when both are. Returns the build shipped, or None."""
    from ftq import evidence
    from ftq.promotion import policy as rules

    merged_task, merged_guard = draw_merged_task(rng), draw_merged_guard(rng)
    task_key = rules.per_example_key(policy["metric"])
    guard = policy["general_guard"]
    merged = rules.Candidate("merged", scores=rows(merged_task, task_key),
                             benchmark_rows=lm_eval_rows(merged_guard, guard["task"], guard["metric"]))
    guard_values, guard_shares = np.array([1.0, 0.0]), np.array([GUARD_RIGHT, 1 - GUARD_RIGHT])
    builds = {name: (draw_build(rng, merged_task, task, FIELD_VALUES, FIELD_SHARES),
                     draw_build(rng, merged_guard, on_guard, guard_values, guard_shares))
              for name, task, on_guard in ladder}

    def test(name: str) -> dict:
        task_scores, guard_scores = builds[name]
        metric = rules.metric_test(rows(task_scores, task_key), merged.scores, policy, name, bounds=False,
                                   resamples=resamples)
        if metric["outcome"] != evidence.FAITHFUL:
            return {"outcome": metric["outcome"]}
        checked = rules.guard_test(lm_eval_rows(guard_scores, guard["task"], guard["metric"]), merged, policy, name,
                                   bounds=False)
        return {"outcome": rules.outcome_of(metric, checked)}

    sizes = [{"name": name, "size_bytes": len(ladder) - i} for i, (name, _, _) in enumerate(ladder)]  # as listed
    _, pick = evidence.fixed_sequence(rules.walk_order(sizes), test)
    return pick


def rates(ladder: list[tuple[str, Truth, Truth]], policy: dict, repeats: int = 1000, seed: int = 0,
          resamples: int = 999) -> dict[str | None, float]:
    """How often each build (None: none) is shipped over `repeats` draws."""
    rng = np.random.default_rng(seed)
    counts: dict[str | None, int] = {}
    for _ in range(repeats):
        pick = decide_once(rng, ladder, policy, resamples)
        counts[pick] = counts.get(pick, 0) + 1
    return {name: count / repeats for name, count in counts.items()}
