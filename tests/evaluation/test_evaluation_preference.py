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


def test_a_candidate_runtime_scores_the_pairs_as_the_stage_does(tiny_model_dir, tokenizer):
    """The evaluate path (Runtime.sequence_nll over the answer tokens, one sequence at a time) and the
    stage's batched, padded scoring agree on the same model and ids."""
    from ftq.data.tokenize import tokenize_preference
    from ftq.runtimes import open_model
    from ftq.stages.preference import answer_logps

    records = [tokenize_preference(tokenizer, {
        "prompt": [{"role": "user", "content": f"Order {i}: {i + 2} lamps for Ana, ship to Lima."}],
        "chosen": {"role": "assistant", "content": '{"customer": "Ana", "city": "Lima"}'},
        "rejected": {"role": "assistant", "content": "Lima" * (i + 1)}}, 256) for i in range(3)]
    runtime = open_model(tiny_model_dir, dtype="float32")
    pairs = [{"id": str(i), "prompt_ids": r.prompt_ids, "chosen_ids": r.answers["chosen"],
              "rejected_ids": r.answers["rejected"], "logp_chosen": 0.0, "logp_rejected": 0.0}
             for i, r in enumerate(records)]
    by_runtime = [preference.candidate_logps(runtime, p) for p in pairs]
    by_stage = answer_logps(runtime.model, records, batch_size=6)  # padded: the rejected answers differ in length
    flat = [v for pair in by_stage for v in pair]
    assert [v for pair in by_runtime for v in pair] == pytest.approx(flat, rel=1e-5)
    rows = preference.candidate_rows(runtime, pairs, beta=0.1)
    assert [r["logp_chosen"] for r in rows] == [round(c, 4) for c, _ in by_runtime]
