"""Stage promote end to end: real builds (the tiny project's q8_0 and q4_0 GGUFs, q4_0 the smaller), a real
sqlite MLflow registry, reports/promotion.json on disk. Per-example scores are set per test, as evaluate
would write them. The policy's rules are tested on made-up scores, without this project, in
tests/promotion/test_promotion_policy.py; these tests check that the stage reads, registers, re-evaluates
and moves the alias as the policy decides."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import load_params, set_params, set_scores
from ftq.promotion.reevaluation import CHAMPION_ANSWERS
from ftq.stages import promote
from ftq.stages.evaluate import report_dir

N = 48  # held-out examples, as in the default evaluation


def registry(project):
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def promote_as(project, name, enabled=("q8_0", "q4_0"), **policy):
    """Promote under `policy`; select: best unless given (the rules below rank every evaluated build)."""
    policy.setdefault("select", "best")
    set_params(project, promote={"model_name": name, "policy": policy}, quantize={"enabled": list(enabled)})
    return promote.run(load_params(project))


def champion_build(project, name):
    return registry(project).get_model_version_by_alias(name, "champion").tags["ftq.build"]


def ones(count, then=0.0, total=N):
    return [1.0] * count + [then] * (total - count)


def by_name(report):
    return {c["name"]: c for c in report["candidates"]}


def test_first_champion_ties_and_the_report(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", ones(40))
    set_scores(project, "q8_0", ones(40))
    set_scores(project, "q4_0", ones(38))  # two examples worse: tied with q8_0, and smaller
    report = promote_as(project, "first")
    assert champion_build(project, "first") == "q4_0" and report["champion"]["note"] == "first champion"
    rows = by_name(report)
    assert rows["q4_0"]["status"] == "champion" and rows["q8_0"]["status"] == "challenger"
    assert rows["q4_0"]["tied_with_best"] and rows["q8_0"]["tied_with_best"]
    low, high = rows["q4_0"]["diff_vs_best_ci95"]
    assert low < 0 <= high and rows["q4_0"]["diff_vs_best"] == pytest.approx(-2 / N, abs=1e-4)
    assert rows["q4_0"]["retention"] == pytest.approx(0.95, abs=1e-4)
    assert rows["q4_0"]["retention_ci95"][0] < 0.95 < rows["q4_0"]["retention_ci95"][1]
    assert report["diff_against_version"] == rows["q4_0"]["version"]
    assert rows["q8_0"]["diff"] == pytest.approx(2 / N, abs=1e-4) and "diff_ci95" in rows["q8_0"]
    assert report["paired_examples"] == N and report["policy"]["confidence"] == 0.95
    on_disk = json.loads((project / "reports" / "promotion.json").read_text())
    assert on_disk["champion"] == report["champion"]


def test_the_champion_moves_on_evidence_or_tie_breakers_only(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", ones(40))
    set_scores(project, "q8_0", ones(44))
    set_scores(project, "q4_0", ones(30))  # 75 % of merged, interval wholly below 95 %: rejected
    first = promote_as(project, "moves")
    assert champion_build(project, "moves") == "q8_0"
    assert by_name(first)["q4_0"]["status"] == "rejected"

    set_scores(project, "q4_0", ones(44))  # as good as the champion, and smaller: the tie-breakers move it
    tied = promote_as(project, "moves")
    assert champion_build(project, "moves") == "q4_0" and tied["champion"]["moved"]
    assert "tied with champion version" in tied["champion"]["note"] and "size_bytes:min" in tied["champion"]["note"]

    set_scores(project, "q8_0", ones(45))  # better by one example: not evidence; the smaller champion stays
    kept = promote_as(project, "moves")
    assert champion_build(project, "moves") == "q4_0" and not kept["champion"]["moved"]
    assert "does not beat champion version" in kept["champion"]["note"]
    assert kept["vs_champion"]["diff_ci95"][0] <= 0

    set_scores(project, "q8_0", ones(N))  # better on every example the champion missed
    set_scores(project, "q4_0", ones(40))
    beaten = promote_as(project, "moves")
    assert champion_build(project, "moves") == "q8_0" and beaten["champion"]["moved"]
    assert "beats champion version" in beaten["champion"]["note"] and beaten["vs_champion"]["diff_ci95"][0] > 0
    assert not by_name(beaten)["q4_0"]["tied_with_best"]


def test_a_stale_champion_is_re_evaluated_on_the_current_examples(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", 1.0)
    set_scores(project, "q8_0", 1.0)
    set_scores(project, "q4_0", 0.0)
    promote_as(project, "stale")
    assert champion_build(project, "stale") == "q8_0"
    # the next experiment builds only q4_0, which now scores 1 everywhere: the champion's stored tags are
    # from another evaluation, so its artifact is downloaded and answers the current examples again
    set_scores(project, "q4_0", 1.0)
    report = promote_as(project, "stale", enabled=("q4_0",), min_retention=0.0)
    assert "re-evaluated on the current 4 examples" in report["champion"]["previous_evaluation"]
    answers = [json.loads(line) for line in (project / CHAMPION_ANSWERS).read_text().splitlines()]
    current = [json.loads(line)["id"] for line in (project / report_dir("q4_0") / "q4_0.answers.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in answers) == sorted(current) and all("answer" in r for r in answers)
    # the tiny random model's real answers get no JSON field right
    assert report["champion"]["previous_metric"] == 0.0
    assert champion_build(project, "stale") == "q4_0" and "beats champion version" in report["champion"]["note"]


def test_a_failing_candidate_never_wins(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", 1.0)
    set_scores(project, "q8_0", 1.0)
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
