"""Promotion by paired comparison on the same examples (reports/eval/<name>.answers.jsonl). The builds are
real (the tiny project's q8_0 and q4_0 GGUFs, q4_0 the smaller); their per-example scores are set per
test, as evaluate would write them, so that each rule of the policy is exercised on known numbers."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import load_params, set_params, set_scores
from ftq.evaluation import paired
from ftq.params import ParamsError
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


def test_paired_intervals():
    same = paired.difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["diff"] == 0 and same["interval"] == [0, 0]
    better = paired.difference(ones(N), ones(40))
    assert better["diff"] == pytest.approx(8 / N, abs=1e-4) and better["interval"][0] > 0
    noisy = paired.difference(ones(41), ones(40))  # one example apart: not a decision
    assert noisy["interval"][0] <= 0 <= noisy["interval"][1]
    kept = paired.ratio(ones(39), ones(N))
    assert kept["ratio"] == pytest.approx(39 / N, abs=1e-4) and kept["interval"][1] < 0.95
    with pytest.raises(ZeroDivisionError):
        paired.ratio(ones(3), [0.0] * N)
    with pytest.raises(paired.PairingError, match="not scored on the same examples"):
        paired.pair({"a": {"x": 1}}, {"b": {"x": 1}}, "x", "q8_0 vs merged")


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


def test_retention_uses_its_interval_and_a_zero_reference_is_an_error(evaluated_copy):
    project = evaluated_copy
    set_scores(project, "merged", ones(N))
    # 81 % of merged (a q4_0 measured on the demo kept 81 % of JSON field accuracy): rejected at the default
    set_scores(project, "q4_0", ones(39))
    # 94.8 % of merged, two fields apart from 95 %: within the noise of 48 examples, kept
    set_scores(project, "q8_0", [1.0] * 44 + [0.75, 0.75, 0.0, 0.0])
    report = promote_as(project, "retention")
    rows = by_name(report)
    assert rows["q4_0"]["status"] == "rejected" and "below 95% at 95% confidence" in rows["q4_0"]["reasons"][0]
    assert rows["q4_0"]["retention_ci95"][1] < 0.95
    assert rows["q8_0"]["retention"] == pytest.approx(45.5 / N, abs=1e-4) and rows["q8_0"]["status"] == "champion"

    set_scores(project, "merged", 0.0)
    with pytest.raises(promote.PromotionError, match=r"merged.json: task_json_field_accuracy is 0"):
        promote_as(project, "retention")


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
    answers = [json.loads(line) for line in (project / promote.CHAMPION_ANSWERS).read_text().splitlines()]
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
    assert champion_build(project, "strict") == "q8_0"
    capped = promote_as(project, "strict", max_size_bytes=1000)  # every build over the cap: the alias stays
    assert all(c["status"] == "rejected" for c in capped["candidates"])
    assert "max_size_bytes" in by_name(capped)["q8_0"]["reasons"][0]
    assert champion_build(project, "strict") == "q8_0" and not capped["champion_passes_policy"]


def hellaswag_rows(correct: list[float]) -> list[dict]:
    return [{"task": "hellaswag", "doc_id": i, "acc_norm": v, "acc": v} for i, v in enumerate(correct)]


GUARD = {"task": "hellaswag", "metric": "acc_norm", "tolerance": 0.02}  # the default policy's guard


def test_the_general_ability_guard_rejects_a_paired_loss_beyond_its_tolerance():
    """Decided on the paired difference over the same items: a build that lost 6 of 300 items' answers
    and kept the rest is rejected at the default tolerance (2 points), one that traded as many answers
    as it lost passes (its own interval alone could not tell), and an absent file skips the guard."""
    merged = {"metrics": {"benchmarks": {}}, "benchmark_rows": hellaswag_rows(ones(120, total=300))}
    lost = {"name": "q2_k", "benchmark_rows": hellaswag_rows(ones(104, total=300))}
    verdict = promote.general_guard(lost, merged, GUARD, 0.95)
    assert verdict["status"] == "rejected" and verdict["diff"] == pytest.approx(-16 / 300, abs=1e-4)
    assert verdict["interval"][1] < -0.02 and "general ability lost: hellaswag acc_norm" in verdict["reason"]
    traded = {"name": "q8_0", "benchmark_rows": hellaswag_rows(ones(110, total=300)[:290] + [1.0] * 10)}
    assert promote.general_guard(traded, merged, GUARD, 0.95)["status"] == "pass"
    small = {"name": "q6_k", "benchmark_rows": hellaswag_rows(ones(117, total=300))}  # 1 point: within tolerance
    assert promote.general_guard(small, merged, GUARD, 0.95)["status"] == "pass"
    absent = {"metrics": {"benchmarks": {"hellaswag": {"status": "skipped: /x/hs.txt is absent. Get ..."}}},
              "benchmark_rows": []}
    skipped = promote.general_guard(lost, absent, GUARD, 0.95)
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("skipped: /x/hs.txt is absent")


def test_policy_is_validated(evaluated_copy):
    project = evaluated_copy
    set_params(project, promote={"model_name": "x", "policy": {"direction": "up"}})
    with pytest.raises(ParamsError, match=r"promote.policy.direction: expected one of max, min, got 'up'"):
        promote.policy_of(load_params(project))
    set_params(project, promote={"model_name": "x", "policy": {"metric": "perplexity"}})
    with pytest.raises(ParamsError, match="scored per example"):
        promote.policy_of(load_params(project))


def set_preference_scores(project, name, ranked: list[float]):
    """Per-pair rows as evaluate writes them (reports/eval/<name>.preference.jsonl) and the mean."""
    rows = [{"id": f"ftq_default_pairs_heldout:{i}", "pref_accuracy": v, "logp_accuracy": v,
             "reward_margin": v - 0.5} for i, v in enumerate(ranked)]
    folder = project / report_dir(name)
    (folder / f"{name}.preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = json.loads((folder / f"{name}.json").read_text())
    report["pref_accuracy"] = sum(ranked) / len(ranked)
    (folder / f"{name}.json").write_text(json.dumps(report))


def test_pref_accuracy_promotes_on_the_held_out_pairs(evaluated_copy):
    project = evaluated_copy
    set_preference_scores(project, "merged", ones(50, total=60))
    set_preference_scores(project, "q8_0", ones(50, total=60))
    set_preference_scores(project, "q4_0", ones(30, total=60))  # half the pairs lost: retention 60 %
    report = promote_as(project, "pref", metric="pref_accuracy")
    rows = by_name(report)
    assert champion_build(project, "pref") == "q8_0"
    assert rows["q4_0"]["status"] == "rejected" and "pref_accuracy retention" in " ".join(rows["q4_0"]["reasons"])
    assert report["paired_examples"] == 60


def test_smallest_tied_promotes_the_smallest_build_tied_with_merged(evaluated_copy):
    """select: smallest_tied: q4_0 (the smaller) is tied with merged and q8_0 is not significantly better
    than it, so q4_0 is champion and the note says why; when q8_0 is significantly better than q4_0 (and
    tied with merged), the larger build wins."""
    project = evaluated_copy
    set_scores(project, "merged", ones(40))
    set_scores(project, "q8_0", ones(41))
    set_scores(project, "q4_0", ones(38))
    report = promote_as(project, "smallest", select="smallest_tied", min_retention=0.0)
    assert champion_build(project, "smallest") == "q4_0"
    assert report["champion"]["note"].startswith("first champion: the smallest build tied with merged")
    set_scores(project, "q4_0", ones(30))  # 10 lost: below merged, and q8_0 is significantly better
    report = promote_as(project, "smallest", select="smallest_tied", min_retention=0.0)
    assert champion_build(project, "smallest") == "q8_0"
    assert report["champion"]["moved"] and "the smallest build tied with merged" in report["champion"]["note"]
