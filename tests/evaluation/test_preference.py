"""Held-out preference scores from log-probabilities (pure)."""

import pytest

from ftq.evaluation import preference


def test_the_reference_against_itself_scores_a_coin():
    logps = [(-3.0, -5.0), (-4.0, -2.0), (-1.0, -1.0)]
    rows = preference.pair_rows(["a", "b", "c"], logps, logps, beta=0.1)
    assert [r["pref_accuracy"] for r in rows] == [0.5, 0.5, 0.5]
    assert [r["reward_margin"] for r in rows] == [0, 0, 0]
    # the model's own ranking still separates the pairs: chosen more likely, less likely, tied
    assert [r["logp_accuracy"] for r in rows] == [1.0, 0.0, 0.5]
    summary = preference.summary(rows)
    assert summary["pref_accuracy"]["mean"] == 0.5 and summary["pref_accuracy_vs_reference"]["diff"] == 0


def test_margin_is_dpo_implicit_reward_difference():
    [row] = preference.pair_rows(["a"], [(-10.0, -8.0)], [(-9.0, -11.0)], beta=0.5)
    # chosen gained 1 nat over the reference, rejected lost 3: 0.5 * (1 - (-3)) = 2
    assert row["reward_margin"] == pytest.approx(2.0)
    assert row["pref_accuracy"] == 1.0 and row["logp_accuracy"] == 1.0 and row["ref_logp_accuracy"] == 0.0


def test_tuned_model_that_learned_the_preference_beats_the_reference_with_an_interval():
    reference = [(-5.0, -5.0 + 0.1 * (i % 3 - 1)) for i in range(60)]
    tuned = [(c + 1.0, r - 1.0) for c, r in reference]
    summary = preference.summary(preference.pair_rows([str(i) for i in range(60)], reference, tuned, beta=0.1))
    assert summary["pref_accuracy"]["mean"] == 1.0
    assert summary["logp_accuracy_vs_reference"]["interval"][0] > 0
    assert summary["reward_margin"]["interval"][0] == pytest.approx(0.2)


def test_unequal_lengths_are_refused():
    with pytest.raises(ValueError, match="2 pairs, 1 reference"):
        preference.pair_rows(["a", "b"], [(-1.0, -2.0)], [(-1.0, -2.0), (-1.0, -2.0)], beta=0.1)
