import json

from ftq.evaluation.task import aggregate, load_examples, rouge_l, score


def test_json_answers_get_validity_and_field_accuracy():
    reference = '{"customer": "Delia", "item": "stapler", "quantity": 3, "city": "Montevideo"}'
    assert score(reference, reference) == {"exact_match": 1.0, "rouge_l": 1.0, "json_valid": 1.0,
                                           "json_field_accuracy": 1.0}
    near = score('{"customer": "Delia", "item": "staplers", "quantity": 3, "city": "Montevideo"}', reference)
    assert near["json_valid"] == 1.0 and near["json_field_accuracy"] == 0.75 and near["exact_match"] == 0.0
    broken = score('{"customer": "Delia", "item"', reference)
    assert broken["json_valid"] == 0.0 and broken["json_field_accuracy"] == 0.0


def test_free_text_gets_rouge_l_and_normalized_exact_match():
    assert score("My name is Wren.", "my name is wren") ["exact_match"] == 1.0
    assert "json_valid" not in score("Paris", "Paris is the capital.")
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == 5 / 6
    assert rouge_l("", "x") == 0.0


def test_examples_take_every_turn_before_the_last_answer(tmp_path):
    path = tmp_path / "eval.jsonl"
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "a2"}], "record": 4, "dataset": "d"}
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "record": 5}) + "\n")
    assert [e["id"] for e in load_examples(path, 0)] == ["d#4", "d#5"]
    [example] = load_examples(path, 1)
    assert example["reference"] == "a2" and [m["content"] for m in example["prompt"]] == ["s", "q1", "a1", "q2"]
    assert example["id"] == "d#4"
    assert aggregate([score("a", "a"), score("b", "a")]) == {"exact_match": 0.5, "rouge_l": 0.5, "examples": 2,
                                                             "json_examples": 0, "exact_match_ci95": [0.0, 1.0],
                                                             "rouge_l_ci95": [0.0, 1.0]}


def test_intervals_narrow_with_more_examples_and_hold_the_mean():
    from ftq.evaluation.task import interval

    few = [1.0, 0.0] * 6  # 12 examples, half right
    many = [1.0, 0.0] * 24  # 48
    low, high = interval(few)
    assert low < 0.5 < high and high - low > 0.4  # 12 examples: about +-0.28
    low48, high48 = interval(many)
    assert low < low48 < 0.5 < high48 < high and high48 - low48 < 0.32
    assert interval(many) == interval(many)  # seeded
    assert interval([1.0] * 10) == [1.0, 1.0]
