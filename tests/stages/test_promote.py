"""Stage promote end to end: real builds (the tiny project's q8_0 and q4_0 GGUFs, q4_0 the smaller), a real
sqlite MLflow registry, reports/promotion.json on disk. Per-example scores are set per test, as evaluate
would write them. The policy's rules are tested on made-up scores, without this project, in
tests/promotion/test_promotion_policy.py; these tests check that the stage reads, registers, re-evaluates
and moves the alias as the policy decides."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import HELLASWAG, load_params, set_params, set_scores
from ftq.promotion.reevaluation import CHAMPION_ANSWERS
from ftq.stages import promote
from ftq.layout import eval_dir as report_dir

N = 100  # made-up held-out examples: enough for the policy's tests to decide
NO_GUARD = {"task": None}  # the tiny project's 8 HellaSwag items decide nothing (the guard: tests/promotion)


def registry(project):
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def promote_as(project, name, enabled=("q8_0", "q4_0"), **policy):
    """Promote under `policy` (the default policy, with the guard off unless given)."""
    policy.setdefault("general_guard", NO_GUARD)
    set_params(project, promote={"model_name": name, "policy": policy}, quantize={"enabled": list(enabled)})
    return promote.run(load_params(project))


def champion_build(project, name):
    return registry(project).get_model_version_by_alias(name, "champion").tags["ftq.build"]


def fields(losses=0, gains=0, total=N):
    """Field accuracies of 0.75 with `losses` examples a quarter lower and `gains` a quarter higher."""
    return [0.5] * losses + [1.0] * gains + [0.75] * (total - losses - gains)


def by_name(report):
    return {c["name"]: c for c in report["candidates"]}


def test_the_best_faithful_build_is_the_first_champion_and_the_report_says_why(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", fields())
    set_scores(project, "q8_0", fields())
    set_scores(project, "q4_0", fields(losses=4, gains=2))  # a little lower, shown within the margin, and smaller
    report = promote_as(project, "first", select="best")
    assert champion_build(project, "first") == "q4_0" and report["champion"]["note"].startswith("first champion")
    rows = by_name(report)
    assert rows["q4_0"]["status"] == "champion" and rows["q8_0"]["status"] == "challenger"
    test = rows["q4_0"]["metric_test"]
    assert test["outcome"] == "faithful" and test["margin"] == 0.05 and test["examples"] == N
    assert test["lower"] >= -0.05 and test["p_value"] <= 0.05 and test["test"].startswith("BCa bootstrap")
    assert "Holm" in report["procedure"] and report["policy"]["confidence"] == 0.95
    on_disk = json.loads((project / "reports" / "promotion.json").read_text())
    assert on_disk["champion"] == report["champion"]


def test_the_champion_moves_on_evidence_or_tie_breakers_only(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", fields())
    set_scores(project, "q8_0", fields())
    set_scores(project, "q4_0", fields(losses=40))  # 0.1 below merged, twice the margin: worse
    first = promote_as(project, "moves", select="best")
    assert champion_build(project, "moves") == "q8_0"
    assert by_name(first)["q4_0"]["status"] == "rejected" and by_name(first)["q4_0"]["metric_test"]["outcome"] == "worse"

    set_scores(project, "q4_0", fields())  # as good as the champion, and smaller: the tie-breakers move it
    tied = promote_as(project, "moves", select="best")
    assert champion_build(project, "moves") == "q4_0" and tied["champion"]["moved"]
    assert "tie-breakers" in tied["champion"]["note"] and "size_bytes:min" in tied["champion"]["note"]

    set_scores(project, "q8_0", fields(gains=1))  # better by one example: not evidence; the smaller champion stays
    kept = promote_as(project, "moves", select="best")
    assert champion_build(project, "moves") == "q4_0" and not kept["champion"]["moved"]

    set_scores(project, "q8_0", fields(gains=30))  # better on many examples
    beaten = promote_as(project, "moves", select="best")
    assert champion_build(project, "moves") == "q8_0" and beaten["champion"]["moved"]
    assert "beats champion version" in beaten["champion"]["note"] and beaten["vs_champion"]["p_value"] <= 0.05


def test_a_stale_champion_is_re_evaluated_on_the_current_examples(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", 1.0)
    set_scores(project, "q8_0", 1.0)
    set_scores(project, "q4_0", 0.0)
    promote_as(project, "stale", margin=0.9)
    assert champion_build(project, "stale") == "q8_0"
    # the next experiment builds only q4_0, which now scores 1 everywhere: the champion's stored tags are
    # from another evaluation, so its artifact is downloaded and answers the current examples again
    set_scores(project, "q4_0", 1.0)
    # 4 current examples: a margin of 0.9 lets them decide (each test's own power is tested elsewhere); the
    # guard on where HellaSwag is here: the re-evaluated champion is scored on it like every candidate
    guard = {"task": "hellaswag", "tolerance": 0.9} if HELLASWAG.exists() else NO_GUARD
    report = promote_as(project, "stale", enabled=("q4_0",), margin=0.9, general_guard=guard)
    if HELLASWAG.exists():
        assert report["champion"]["previous_tests"]["general_guard"]["items"] > 0
    assert "re-evaluated on the current 4 examples" in report["champion"]["previous_evaluation"]
    answers = [json.loads(line) for line in (project / CHAMPION_ANSWERS).read_text().splitlines()]
    current = [json.loads(line)["id"] for line in (project / report_dir("q4_0") / "q4_0.answers.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in answers) == sorted(current) and all("answer" in r for r in answers)
    # the tiny random model's real answers get no JSON field right
    assert report["champion"]["previous_metric"] == 0.0
    assert champion_build(project, "stale") == "q4_0" and "no longer passes the policy" in report["champion"]["note"]


def test_a_guard_whose_data_is_absent_fails_closed(evaluated_copy):
    """merged was not scored on the guard's task (its rows are gone): no build can be shown to keep general
    ability, so none ships, and the reason says how to switch the guard off by name."""
    project = evaluated_copy
    set_scores(project, "merged", fields())
    set_scores(project, "q8_0", fields())
    samples = project / report_dir("merged") / "lm_eval" / "merged.samples.jsonl"
    samples.write_text("".join(line + "\n" for line in samples.read_text().splitlines()
                               if json.loads(line).get("task") != "hellaswag"))
    report = promote_as(project, "closed", enabled=("q8_0",), general_guard={"task": "hellaswag"})
    line = by_name(report)["q8_0"]
    assert line["status"] == "rejected" and line["general_guard"]["outcome"] == "absent"
    assert "general_guard.task: null" in line["reasons"][0] and report["champion"]["version"] is None


def test_a_failing_candidate_never_wins(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", fields())
    set_scores(project, "q8_0", fields())
    evaluation = project / report_dir("q4_0") / "q4_0.json"
    evaluation.unlink()  # its evaluation is missing (failed)
    report = promote_as(project, "strict")
    assert by_name(report)["q4_0"]["status"] == "rejected" and "not evaluated" in by_name(report)["q4_0"]["reasons"][0]
    assert by_name(report)["q4_0"]["version"] is None  # an unevaluated build is not registered
    assert champion_build(project, "strict") == "q8_0"
    capped = promote_as(project, "strict", max_size_bytes=1000)  # every build over the cap: the alias stays
    assert all(c["status"] == "rejected" for c in capped["candidates"])
    assert "max_size_bytes" in by_name(capped)["q8_0"]["reasons"][0]
    assert champion_build(project, "strict") == "q8_0" and not capped["champion_passes_policy"]
