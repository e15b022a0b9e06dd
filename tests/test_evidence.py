"""ftq.evidence, the statistics every promotion decision rests on: known values, the exact test's level by
simulation, agreement with scipy where scipy has the same statistic (milliseconds to seconds: no files)."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import bootstrap

from ftq import evidence


def test_tango_statistic_is_mcnemar_at_zero_and_uses_the_constrained_maximum_likelihood():
    assert evidence.tango_statistic(7, 12, 100, 0.0) == pytest.approx((7 - 12) / np.sqrt(19))
    wins, losses, n, delta = 7, 12, 100, -0.03

    def negative_log_likelihood(p_loss):
        p_win = p_loss + delta
        return -(wins * np.log(p_win) + losses * np.log(p_loss) + (n - wins - losses) * np.log(1 - p_win - p_loss))

    best = minimize_scalar(negative_log_likelihood, bounds=(0.03 + 1e-9, 0.515 - 1e-9), method="bounded").x
    variance = n * (2 * best + delta * (1 - delta))
    assert evidence.tango_statistic(wins, losses, n, delta) == pytest.approx(
        (wins - losses - n * delta) / np.sqrt(variance), rel=1e-5)


@pytest.mark.parametrize("p_loss", [0.05, 0.1, 0.2, 0.35])
def test_the_exact_test_keeps_its_level_on_the_null_s_boundary(p_loss):
    """Paired 0/1 outcomes with p(win) - p(loss) exactly -margin: the probability of 'faithful', summed over
    every possible outcome (not sampled), is at most 5 %."""
    from scipy.stats import multinomial

    n, margin = 40, 0.05
    p_win = p_loss - margin
    level = sum(multinomial.pmf([w, l, n - w - l], n, [p_win, p_loss, 1 - p_win - p_loss])
                for w in range(n + 1) for l in range(n + 1 - w)
                if evidence.exact_p_value(w, l, n, -margin) <= 0.05)
    assert level <= 0.05, level


def test_three_outcomes_and_the_examples_an_inconclusive_one_needs():
    merged = [1.0] * 150 + [0.0] * 150
    same = evidence.non_inferiority(merged, merged, 0.04)
    assert same["outcome"] == "faithful" and same["lower"] <= 0 <= same["upper"]
    few = evidence.non_inferiority([1.0] * 2 + [0.0] * 6 + merged[8:], [0.0] * 2 + [1.0] * 6 + merged[8:], 0.03)
    assert few["outcome"] == "inconclusive" and few["needed_examples"] > 300 and few["lower"] < -0.03 < few["upper"]
    lost = evidence.non_inferiority([0.0] * 40 + merged[40:], merged, 0.04)
    assert lost["outcome"] == "worse" and lost["upper"] < -0.04 and lost["p_worse"] <= 0.05


def test_no_difference_seen_on_few_examples_is_not_yet_faithful():
    """40 identical answers cannot exclude a 5-point loss (a rare difference may not have shown yet): not
    on 0/1 scores (the exact test) and not on graded ones (bounded by the scores' range, never resampled);
    80 can, and the examples an inconclusive result asks for are the ones that would do."""
    same = [1.0] * 20 + [0.0] * 20
    assert evidence.non_inferiority(same, same, 0.05)["outcome"] == "inconclusive"
    graded = [0.75] * 40
    few = evidence.non_inferiority(graded, graded, 0.05)
    assert few["outcome"] == "inconclusive" and few["lower"] < -0.05 and "not resampled" in few["note"]
    assert evidence.non_inferiority([0.75] * few["needed_examples"], [0.75] * few["needed_examples"],
                                    0.05)["outcome"] == "faithful"
    assert evidence.non_inferiority([0.75] * 80, [0.75] * 80, 0.05)["outcome"] == "faithful"


def test_the_bca_bound_is_scipy_s_and_its_p_value_agrees_with_it():
    rng = np.random.default_rng(0)
    build, merged = rng.choice([0.5, 0.75, 1.0], 60), rng.choice([0.5, 0.75, 1.0], 60)
    result = evidence.non_inferiority(build, merged, 0.05, seed=3)
    reference = bootstrap((build - merged,), np.mean, method="BCa", alternative="greater", confidence_level=0.95,
                          n_resamples=evidence.BOOTSTRAP_SAMPLES, rng=np.random.default_rng(3)).confidence_interval
    assert result["lower"] == pytest.approx(reference.low, abs=0.002)
    for margin in (0.02, 0.1, 0.2, 0.3, -result["lower"] - 0.002, -result["lower"] + 0.002):
        test = evidence.non_inferiority(build, merged, margin, seed=3)
        assert (test["p_value"] <= 0.05) == (test["lower"] >= -margin)


def test_superiority_is_exact():
    # the case: 4 wins and no loss of 40, a quarter of the fields each; percentile bootstrap said 'beats'
    four = evidence.superiority([0.25] * 4 + [0.0] * 36, [0.0] * 40)
    assert four["p_value"] == pytest.approx(0.0625) and not four["better"]
    mcnemar = evidence.superiority([1.0] * 9 + [0.0] * 31, [0.0] * 9 + [0.0] * 31)
    assert mcnemar["p_value"] == pytest.approx(0.5 ** 9) and mcnemar["better"]


def test_a_single_score_of_0_1_items_gets_an_exact_interval():
    # GSM8K: 0 of 16, reported as [0.0, 0.0] by the percentile bootstrap
    assert evidence.mean_interval([0.0] * 16) == {"mean": 0.0, "interval": [0.0, 0.2059], "examples": 16,
                                                 "method": "Clopper-Pearson (exact)"}
    continuous = evidence.mean_interval([0.25, 0.5, 1.0, 0.75] * 10)
    assert continuous["method"] == "BCa bootstrap" and continuous["interval"][0] < 0.625 < continuous["interval"][1]


def test_several_tests_share_one_error_budget():
    outcomes = {"q8_0": "faithful", "q4_k_m": "faithful", "q4_0": "inconclusive", "q2_k": "faithful"}
    tests, pick = evidence.fixed_sequence(list(outcomes), lambda name: {"outcome": outcomes[name]})
    assert pick == "q4_k_m" and [t["name"] for t in tests] == ["q8_0", "q4_k_m", "q4_0"]  # q2_k never tested
    assert evidence.holm({"a": 0.01, "b": 0.04, "c": 0.03}, 0.05) == {"a": True, "c": False, "b": False}
    assert evidence.holm({"a": 0.01, "b": 0.02}, 0.05) == {"a": True, "b": True}


def test_scores_must_be_paired():
    with pytest.raises(evidence.PairingError, match="not scored on the same examples"):
        evidence.pair({"a": {"x": 1}}, {"b": {"x": 1}}, "x", "q8_0 vs merged")
    with pytest.raises(evidence.PairingError, match="field 'x' is missing"):
        evidence.pair({"a": {"y": 1}}, {"a": {"y": 1}}, "x", "q8_0 vs merged")
