"""The whole promotion decision (the ladder's fixed-sequence walk, the metric's non-inferiority test, the
general-ability guard, the pick) repeated on simulated per-example scores of known truth
(ftq.promotion.simulation): the false-acceptance rate of a build truly worse by twice the margin is at most
1 - confidence (plus Monte Carlo slack), and a build equal to merged ships with power at least 0.8, at the
demo's sizes. The same simulation's figures for the old rule are in reports/bench/decision_rule.json."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ftq import schema
from ftq.promotion import simulation
from ftq.promotion.simulation import Truth

REPEATS = 1000
POLICY = schema.defaults("promote")["policy"]
ALPHA = 1 - POLICY["confidence"]
SLACK = 3 * np.sqrt(ALPHA * (1 - ALPHA) / REPEATS)  # three Monte Carlo standard errors
MARGIN, TOLERANCE = POLICY["margin"], POLICY["general_guard"]["tolerance"]
# q8_0-like: almost no example differs; q4_k_m-like: as the demo's q4_k_m differed from merged (6 of 40
# orders by one step, 8 of 300 HellaSwag items)
NEAR = (Truth(0.02), Truth(0.01))
EQUAL = (Truth(0.15), Truth(0.06))


def test_the_simulation_has_the_demo_s_sizes():
    root = Path(__file__).resolve().parents[2]
    heldout = json.loads((root / "data/raw/ftq_default/heldout.json").read_text())
    assert sum(r["output"].startswith("{") for r in heldout) == simulation.TASK_EXAMPLES
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["evaluate"]["lm_eval"]["local_data"]["hellaswag"]["sample"] == simulation.GUARD_ITEMS
    assert params["evaluate"]["task_examples"] == 0  # every held-out example is answered


@pytest.mark.parametrize("task, guard", [
    (Truth(0.15, 2 * MARGIN), Truth(0.06)),               # a step lost on many examples
    (Truth(0.15, 2 * MARGIN, "fail"), Truth(0.06)),       # rare answers that score 0
    (Truth(0.15), Truth(0.06, 2 * TOLERANCE)),            # general ability lost, the task kept
], ids=["metric-steps", "metric-failures", "guard"])
def test_a_build_worse_by_twice_the_margin_ships_at_most_alpha_of_the_time(task, guard):
    rates = simulation.rates([("q8_0", *NEAR), ("q4_k_m", task, guard), ("q3_k_m", task, guard)], POLICY,
                             repeats=REPEATS, seed=1)
    shipped_bad = rates.get("q4_k_m", 0) + rates.get("q3_k_m", 0)
    assert shipped_bad <= ALPHA + SLACK, rates


def test_at_the_margin_itself_the_level_holds_within_monte_carlo_error():
    """The null's boundary, where a test's level is decided: a build truly worse by exactly the margin ships
    about 1 - confidence of the time (the BCa bootstrap's level is approximate, not exact: within slack)."""
    rates = simulation.rates([("q8_0", *NEAR), ("q4_k_m", Truth(0.15, MARGIN), Truth(0.06))], POLICY,
                             repeats=REPEATS, seed=3)
    assert rates.get("q4_k_m", 0) <= ALPHA + SLACK, rates


def test_a_build_equal_to_merged_ships_with_power_at_least_0_8():
    worse = (Truth(0.15, 2 * MARGIN), Truth(0.06))
    rates = simulation.rates([("q8_0", *NEAR), ("q4_k_m", *EQUAL), ("q4_k_m_no_imatrix", *worse)], POLICY,
                             repeats=REPEATS, seed=2)
    assert rates.get("q4_k_m", 0) >= 0.8, rates
    assert rates.get("q4_k_m_no_imatrix", 0) <= ALPHA + SLACK, rates
