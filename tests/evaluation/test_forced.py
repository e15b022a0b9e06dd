"""Teacher-forced scores of the held-out answers (ftq.evaluation.forced), on the real SmolLM2 tokenizer and
chat template with tiny random models in transformers; the pipeline's use (every candidate, GGUF builds
in llama.cpp) is tested in tests/stages/test_evaluate.py."""

import numpy as np
import pytest

from conftest import build_tiny_model
from ftq.evaluation import forced
from ftq.runtimes import open_model

EXAMPLES = [
    {"id": "set#0", "prompt": [{"role": "user", "content": "Order two apples as JSON."}],
     "reference": '{"item": "apple", "quantity": 2}'},
    {"id": "set#1", "prompt": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Say hello."}], "reference": "Hello."},
    {"id": "set#2", "prompt": [{"role": "user", "content": "A list of three colours?"}],
     "reference": "Red, green and blue."},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, tiny_model_dir):
    """merged (the tiny model) and a build that differs from it (the same shape, other weights)."""
    other = tmp_path_factory.mktemp("other-tiny")
    build_tiny_model(tokenizer, seed=1).save_pretrained(other, safe_serialization=True)
    tokenizer.save_pretrained(other)
    merged, build = open_model(tiny_model_dir), open_model(other)
    yield merged, build
    merged.close()
    build.close()


def test_the_answer_is_scored_after_the_generation_prompt_with_the_templates_end_of_turn(tokenizer):
    ids, scored = forced.token_ids(tokenizer, EXAMPLES[0], 512)
    prompt = tokenizer.apply_chat_template(EXAMPLES[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    assert ids[:len(prompt)] == prompt and not any(scored[:len(prompt)]) and all(scored[len(prompt):])
    assert tokenizer.decode(ids[len(prompt):]) == EXAMPLES[0]["reference"] + "<|im_end|>"


def test_a_long_prompt_is_cut_from_the_left_and_a_too_long_answer_is_an_error_naming_the_example(tokenizer):
    ids, scored = forced.token_ids(tokenizer, EXAMPLES[0], 20)
    answer = tokenizer(EXAMPLES[0]["reference"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 20 and ids[-len(answer):] == answer and sum(scored) == len(answer)
    with pytest.raises(ValueError, match=r"example set#0: its reference answer has \d+ tokens"):
        forced.token_ids(tokenizer, EXAMPLES[0], 8)


def test_merged_is_zero_from_itself_and_a_different_model_is_not(models, tokenizer):
    merged, build = models
    reference = forced.reference(merged, tokenizer, EXAMPLES, top_k=64, max_length=512)
    own = forced.rows(merged, reference)
    assert [r["id"] for r in own] == ["set#0", "set#1", "set#2"]
    assert all(r["kld"] == pytest.approx(0, abs=1e-6) for r in own)
    # the log-probability is the reference's own per answer token, averaged per example
    start = 0
    for row in own:
        end = start + row["tokens"]
        assert row["logprob"] == pytest.approx(float(reference.target_logprobs[start:end].mean()), rel=1e-5)
        start = end
    for stored, measured in zip(forced.own_rows(reference), own):  # merged's rows without a second pass
        assert stored == {**measured, "kld": 0.0, "logprob": pytest.approx(measured["logprob"], rel=1e-5)}
    other = forced.rows(build, reference)
    assert all(r["kld"] > 1e-4 for r in other)
    assert [r["tokens"] for r in other] == [r["tokens"] for r in own]
    summary = forced.aggregate(other)
    assert summary["forced_kld_examples"] == 3 and summary["forced_tokens"] == sum(r["tokens"] for r in own)
    low, high = summary["forced_kld_ci95"]
    assert low <= summary["forced_kld"] <= high


def test_a_reference_whose_ids_do_not_match_its_sequences_is_refused(models, tokenizer):
    merged, _ = models
    reference = forced.reference(merged, tokenizer, EXAMPLES, top_k=8, max_length=512)
    reference.meta["example_ids"] = reference.meta["example_ids"][:2]  # stored ids that do not match its sequences
    with pytest.raises(ValueError, match="names 2 examples for 3 sequences: rerun `dvc repro evaluate_merged`"):
        forced.rows(merged, reference)


def test_a_reference_of_other_examples_or_another_top_k_is_refused(models, tokenizer):
    """Outside DVC (ftq evaluate by hand after the held-out set changed) a stale distribution is an error."""
    merged, _ = models
    reference = forced.reference(merged, tokenizer, EXAMPLES, top_k=8, max_length=512)
    forced.check_examples(reference, EXAMPLES, 8, "models/reference_heldout")  # the same: accepted
    with pytest.raises(ValueError, match="models/reference_heldout: merged's held-out distribution is of 3 other"):
        forced.check_examples(reference, EXAMPLES[:2], 8, "models/reference_heldout")
    with pytest.raises(ValueError, match=r"another top_k \(8, set 16\)"):
        forced.check_examples(reference, EXAMPLES, 16, "models/reference_heldout")


@pytest.mark.parametrize("metric,setting,value,message", [
    ("forced_kld", "direction", "max", "forced_kld is read with direction min"),
    ("forced_logprob", "direction", "min", "forced_logprob is read with direction max"),
    ("forced_kld", "margin_scale", "relative", "takes an absolute margin"),
])
def test_a_teacher_forced_metric_read_the_wrong_way_is_a_settings_error(metric, setting, value, message):
    from ftq.params import ParamsError
    from ftq.promotion.policy import policy_of

    direction = forced.DIRECTIONS[metric]
    params = {"_path": "params.yaml", "promote": {"policy": {"metric": metric, "direction": direction, setting: value}}}
    with pytest.raises(ParamsError, match=f"params.yaml: promote.policy.{setting}: .*{message}"):
        policy_of(params)
    params["promote"]["policy"][setting] = {"direction": direction, "margin_scale": "absolute"}[setting]
    assert policy_of(params)["metric"] == metric


def test_kld_per_position_is_exact_with_every_token_kept_and_a_lower_bound_with_a_tail_bucket():
    """top_k = vocabulary: the exact KL. top_k below it: the KL over the partition {each kept token, the rest},
    computed by hand, which is at most the exact KL (merging outcomes never increases a divergence)."""
    from ftq.quantize.distance import log_softmax, position_kld

    rng = np.random.default_rng(0)
    p, q = log_softmax(rng.normal(size=(5, 12))), log_softmax(rng.normal(size=(5, 12)))
    order = np.argsort(-p, axis=1)
    exact = (np.exp(p) * (p - q)).sum(axis=1)
    assert position_kld(order, np.take_along_axis(p, order, axis=1), q) == pytest.approx(exact, abs=1e-9)
    kept = order[:, :4]
    head_p, head_q = np.take_along_axis(np.exp(p), kept, axis=1), np.take_along_axis(np.exp(q), kept, axis=1)
    tail_p, tail_q = 1 - head_p.sum(axis=1), 1 - head_q.sum(axis=1)
    coarse = (head_p * np.log(head_p / head_q)).sum(axis=1) + tail_p * np.log(tail_p / tail_q)
    partitioned = position_kld(kept, np.take_along_axis(p, kept, axis=1), q)
    assert partitioned == pytest.approx(coarse, abs=1e-9)
    assert np.all(partitioned <= exact + 1e-12) and np.all(tail_p > 0.05)  # a real bucket, not an empty one


def test_a_champion_from_another_fine_tune_cannot_be_judged_on_a_teacher_forced_metric():
    """A teacher-forced score measures closeness to this run's merged: an older champion made from another
    merged model would always lose, so promote stops with the reason instead of moving the alias."""
    from ftq.promotion.policy import PromotionError
    from ftq.promotion.reevaluation import ChampionReevaluation
    from ftq.registry.aliases import Registered

    decide = ChampionReevaluation("ftq-test", [], None, {"metric": "forced_kld"}, {}, None)
    with pytest.raises(PromotionError, match="champion version 3 is not among this run's builds.*forced_kld"):
        decide(Registered("3"))
    assert decide(None) is None  # no champion yet: nothing to judge against


def test_small_values_keep_three_significant_digits():
    from ftq.evidence import _round

    assert _round(0.0000123456) == 0.0000123 and _round(-0.0375449) == -0.0375 and _round(0.0) == 0.0
