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
        assert row["logprob"] == pytest.approx(float(reference.target_logprobs[start:end].mean()), abs=1e-5)
        start = end
    other = forced.rows(build, reference)
    assert all(r["kld"] > 1e-4 for r in other)
    assert [r["tokens"] for r in other] == [r["tokens"] for r in own]
    summary = forced.aggregate(other)
    assert summary["forced_kld_examples"] == 3 and summary["forced_tokens"] == sum(r["tokens"] for r in own)
    low, high = summary["forced_kld_ci95"]
    assert low <= summary["forced_kld"] <= high


def test_a_reference_from_other_examples_is_refused(models, tokenizer):
    merged, _ = models
    reference = forced.reference(merged, tokenizer, EXAMPLES, top_k=8, max_length=512)
    reference.meta["example_ids"] = reference.meta["example_ids"][:2]  # stored ids that do not match its sequences
    with pytest.raises(ValueError, match="rerun `dvc repro evaluate_merged`"):
        forced.rows(merged, reference)


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


def test_kld_per_position_matches_the_full_distribution_where_top_k_holds_it_all():
    """With every token kept (top_k = vocabulary), the partitioned KL is the exact KL."""
    from ftq.quantize.distance import log_softmax, position_kld

    rng = np.random.default_rng(0)
    p, q = log_softmax(rng.normal(size=(5, 12))), log_softmax(rng.normal(size=(5, 12)))
    order = np.argsort(-p, axis=1)
    exact = (np.exp(p) * (p - q)).sum(axis=1)
    assert position_kld(order, np.take_along_axis(p, order, axis=1), q) == pytest.approx(exact, abs=1e-9)
