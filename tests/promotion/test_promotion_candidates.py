"""Reading builds into candidates (ftq.promotion.candidates), on files written as quantize and evaluate
write them in a temporary folder: no models, no MLflow."""

import json

from ftq.promotion.candidates import read_candidate, read_merged


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def evaluated(root, name, folder):
    write(root / folder / f"{name}.json", json.dumps({"task_json_field_accuracy": 0.5, "pref_accuracy": 1.0}))
    write(root / folder / f"{name}.answers.jsonl", jsonl([{"id": "a", "json_field_accuracy": 1.0},
                                                          {"id": "b", "json_field_accuracy": 0.0}]))
    write(root / folder / f"{name}.preference.jsonl", jsonl([{"id": "p", "pref_accuracy": 1.0}]))
    write(root / folder / "lm_eval" / f"{name}.samples.jsonl", jsonl([{"task": "hellaswag", "doc_id": 0, "acc_norm": 1}]))


def test_a_build_is_read_with_the_scores_of_the_policy_metric(tmp_path):
    write(tmp_path / "models/quantized/q4_0/manifest.json", json.dumps({"size_bytes": 7, "check": {"passed": True}}))
    evaluated(tmp_path, "q4_0", "reports/eval/builds")
    build = read_candidate(tmp_path, "q4_0", "task_json_field_accuracy")
    assert build.manifest["size_bytes"] == 7 and build.size_bytes == 7
    assert build.metrics["task_json_field_accuracy"] == 0.5 and sorted(build.scores) == ["a", "b"]
    assert build.benchmark_rows == [{"task": "hellaswag", "doc_id": 0, "acc_norm": 1}]
    assert sorted(read_candidate(tmp_path, "q4_0", "pref_accuracy").scores) == ["p"]  # the held-out pairs


def test_leftover_scores_without_an_evaluation_do_not_count(tmp_path):
    evaluated(tmp_path, "q8_0", "reports/eval/builds")
    (tmp_path / "reports/eval/builds/q8_0.json").unlink()  # its evaluation failed this time
    build = read_candidate(tmp_path, "q8_0", "task_json_field_accuracy")
    assert build.manifest is None and build.metrics is None and build.scores is None and build.benchmark_rows is None


def test_merged_is_read_from_reports_eval_and_is_none_until_evaluated(tmp_path):
    assert read_merged(tmp_path, "task_json_field_accuracy") is None
    evaluated(tmp_path, "merged", "reports/eval")
    merged = read_merged(tmp_path, "task_json_field_accuracy")
    assert merged.name == "merged" and sorted(merged.scores) == ["a", "b"]
