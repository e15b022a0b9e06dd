"""The promotion policy and its report on made-up per-example scores (ftq.promotion.policy and .report are
pure: no models, no MLflow, no files). Each build's scores are a list of per-example values, as evaluate
would write them to reports/eval/<name>.answers.jsonl; versions are given as the registry would give them."""

import pytest

from ftq import schema
from ftq.evaluation import paired
from ftq.params import ParamsError
from ftq.promotion.policy import (Candidate, Contender, Incumbent, PromotionError, decide, general_guard, judge,
                                  policy_of)
from ftq.promotion.report import promotion_report

N = 48  # held-out examples, as in the default evaluation
SIZES = {"q8_0": 300, "q4_0": 150}  # q4_0 the smaller
# the default policy, every evaluated build ranked (select: best) unless a test asks for smallest_tied
POLICY = {**schema.defaults("promote")["policy"], "select": "best"}


def ones(count, then=0.0, total=N):
    return [1.0] * count + [then] * (total - count)


def build(name, values, key="json_field_accuracy", metric="task_json_field_accuracy", size=None):
    """A build evaluated on `values` (one per example), its check passed."""
    size = size if size is not None else SIZES.get(name, 100)
    return Candidate(name, manifest={"check": {"passed": True}, "size_bytes": size},
                     metrics={metric: round(sum(values) / len(values), 4), "size_bytes": size},
                     scores={f"t#{i}": {"id": f"t#{i}", key: float(v)} for i, v in enumerate(values)})


def merged(values, **kwargs):
    return Candidate("merged", metrics=build("merged", values, **kwargs).metrics,
                     scores=build("merged", values, **kwargs).scores)


VERSIONS = {"q8_0": "1", "q4_0": "2"}


def contenders(candidates, reference, policy=POLICY):
    return [Contender(c, VERSIONS.get(c.name), judge(c, reference, policy)) for c in candidates]


def promote(candidates, reference, champion=None, policy=POLICY, incumbent=None):
    """One promotion: the decision, its report and the contenders, as stage promote makes them. The
    incumbent is the version `champion` among this run's builds (as ftq.promotion.reevaluation finds it),
    or `incumbent` as given."""
    entered = contenders(candidates, reference, policy)
    if champion is not None:
        incumbent = next(Incumbent(c, f"evaluated in this run as build {c.name}") for c in entered
                         if c.version == champion)
    decision = decide(entered, incumbent, policy, reference)
    return decision, promotion_report("m", policy, entered, decision, reference), entered


def by_name(report):
    return {c["name"]: c for c in report["candidates"]}


def champion_name(decision, entered):
    return next(c.name for c in entered if c.version == decision.champion_version)


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


def test_first_champion_ties_and_the_report():
    # q4_0 two examples worse: tied with q8_0, and smaller
    decision, report, entered = promote([build("q8_0", ones(40)), build("q4_0", ones(38))], merged(ones(40)))
    assert champion_name(decision, entered) == "q4_0" and decision.moves_to == VERSIONS["q4_0"]
    assert report["champion"]["note"] == "first champion" and report["champion"]["moved"]
    rows = by_name(report)
    assert rows["q4_0"]["status"] == "champion" and rows["q8_0"]["status"] == "challenger"
    assert decision.challenger == VERSIONS["q8_0"] and report["challenger"] == VERSIONS["q8_0"]
    assert rows["q4_0"]["tied_with_best"] and rows["q8_0"]["tied_with_best"]
    low, high = rows["q4_0"]["diff_vs_best_ci95"]
    assert low < 0 <= high and rows["q4_0"]["diff_vs_best"] == pytest.approx(-2 / N, abs=1e-4)
    assert rows["q4_0"]["retention"] == pytest.approx(0.95, abs=1e-4)
    assert rows["q4_0"]["retention_ci95"][0] < 0.95 < rows["q4_0"]["retention_ci95"][1]
    assert report["diff_against_version"] == rows["q4_0"]["version"]
    assert rows["q8_0"]["diff"] == pytest.approx(2 / N, abs=1e-4) and "diff_ci95" in rows["q8_0"]
    assert report["paired_examples"] == N and report["policy"]["confidence"] == 0.95
    assert report["champion"]["previous"] is None and report["vs_champion"] is None


def test_the_champion_moves_on_evidence_or_tie_breakers_only():
    reference = merged(ones(40))
    # q4_0 keeps 75 % of merged, its interval wholly below 95 %: rejected
    first, report, entered = promote([build("q8_0", ones(44)), build("q4_0", ones(30))], reference)
    assert champion_name(first, entered) == "q8_0" and by_name(report)["q4_0"]["status"] == "rejected"

    # as good as the champion, and smaller: the tie-breakers move it
    builds = [build("q8_0", ones(44)), build("q4_0", ones(44))]
    tied, report, entered = promote(builds, reference, first.champion_version)
    assert champion_name(tied, entered) == "q4_0" and report["champion"]["moved"]
    assert "tied with champion version" in tied.note and "size_bytes:min" in tied.note
    assert report["champion"]["previous"] == VERSIONS["q8_0"]

    # better by one example: not evidence; the smaller champion stays
    builds = [build("q8_0", ones(45)), build("q4_0", ones(44))]
    kept, report, entered = promote(builds, reference, tied.champion_version)
    assert champion_name(kept, entered) == "q4_0" and kept.moves_to is None and not report["champion"]["moved"]
    assert "does not beat champion version" in kept.note and report["vs_champion"]["diff_ci95"][0] <= 0

    # better on every example the champion missed
    builds = [build("q8_0", ones(N)), build("q4_0", ones(40))]
    beaten, report, entered = promote(builds, reference, kept.champion_version)
    assert champion_name(beaten, entered) == "q8_0" and report["champion"]["moved"]
    assert "beats champion version" in beaten.note and report["vs_champion"]["diff_ci95"][0] > 0
    assert not by_name(report)["q4_0"]["tied_with_best"]


def test_the_incumbent_wins_an_exact_tie():
    reference = merged(ones(40))
    builds = [build("q8_0", ones(44), size=100), build("q4_0", ones(44), size=100)]  # the same in every way
    first, _, entered = promote(builds, reference)
    other = next(c for c in entered if c.version != first.champion_version)  # say the other one was champion
    decision, report, _ = promote(builds, reference, other.version)
    assert decision.moves_to is None and decision.champion_version == other.version
    assert report["champion"]["previous_evaluation"] == f"evaluated in this run as build {other.name}"
    assert decision.note.startswith(f"best candidate {first.ranking[0].contender.name} does not beat champion")


def test_a_re_evaluated_champion_with_no_scores_is_replaced():
    unscored = Candidate("v7 (q2_k)", manifest={"check": {"passed": True}, "size_bytes": 1})
    stale = Contender(unscored, "7", judge(unscored, None, POLICY))
    decision, report, _ = promote([build("q8_0", ones(44))], merged(ones(40)), incumbent=Incumbent(stale, "re-evaluated"))
    assert decision.moves_to == VERSIONS["q8_0"]
    assert decision.note.startswith("champion version 7 has no scores on the current examples (not evaluated")
    assert report["diff_against_version"] == VERSIONS["q8_0"]  # the new champion: the old one has no scores


def test_retention_uses_its_interval_and_a_zero_reference_is_an_error():
    reference = merged(ones(N))
    # 81 % of merged (a q4_0 measured on the demo kept 81 % of JSON field accuracy): rejected at the default
    low = judge(build("q4_0", ones(39)), reference, POLICY)
    assert not low.passes and "below 95% at 95% confidence" in low.reasons[0] and low.retention["interval"][1] < 0.95
    # 94.8 % of merged, two fields apart from 95 %: within the noise of 48 examples, kept
    near = judge(build("q8_0", [1.0] * 44 + [0.75, 0.75, 0.0, 0.0]), reference, POLICY)
    assert near.passes and near.retention["ratio"] == pytest.approx(45.5 / N, abs=1e-4)
    with pytest.raises(PromotionError, match=r"merged.json: task_json_field_accuracy is 0"):
        judge(build("q8_0", ones(N)), merged([0.0] * N), POLICY)
    assert judge(build("q8_0", ones(N)), merged([0.0] * N), {**POLICY, "min_retention": 0.0}).passes


def test_a_failing_candidate_never_wins():
    reference = merged(ones(N))
    failed = Candidate("q4_0", manifest={"check": {"passed": True}, "size_bytes": 150})  # its evaluation failed
    first, report, entered = promote([build("q8_0", ones(N)), failed], reference)
    assert by_name(report)["q4_0"]["status"] == "rejected" and "not evaluated" in by_name(report)["q4_0"]["reasons"][0]
    assert champion_name(first, entered) == "q8_0"
    unchecked = Candidate("q4_0", manifest={"check": {"passed": False}, "size_bytes": 150})
    assert judge(unchecked, reference, POLICY).reasons == ["its quantize check did not pass"]
    assert judge(Candidate("q2_k"), reference, POLICY).reasons[0].startswith("no build")

    capped = {**POLICY, "max_size_bytes": 100}  # every build over the cap: the alias stays
    builds = [build("q8_0", ones(N)), build("q4_0", ones(N))]
    stays, report, _ = promote(builds, reference, first.champion_version, capped)
    assert all(c["status"] == "rejected" for c in report["candidates"])
    assert "max_size_bytes" in by_name(report)["q8_0"]["reasons"][0]
    assert stays.moves_to is None and stays.champion_version == VERSIONS["q8_0"]
    assert not report["champion_passes_policy"] and report["champion"]["version"] == VERSIONS["q8_0"]


def hellaswag_rows(correct: list[float]) -> list[dict]:
    return [{"task": "hellaswag", "doc_id": i, "acc_norm": v, "acc": v} for i, v in enumerate(correct)]


GUARD = {"task": "hellaswag", "metric": "acc_norm", "tolerance": 0.02}  # the default policy's guard


def test_the_general_ability_guard_rejects_a_paired_loss_beyond_its_tolerance():
    """Decided on the paired difference over the same items: a build that lost 6 of 300 items' answers
    and kept the rest is rejected at the default tolerance (2 points), one that traded as many answers
    as it lost passes (its own interval alone could not tell), and an absent file skips the guard."""
    reference = Candidate("merged", metrics={"benchmarks": {}}, benchmark_rows=hellaswag_rows(ones(120, total=300)))
    lost = Candidate("q2_k", benchmark_rows=hellaswag_rows(ones(104, total=300)))
    verdict = general_guard(lost, reference, GUARD, 0.95)
    assert verdict["status"] == "rejected" and verdict["diff"] == pytest.approx(-16 / 300, abs=1e-4)
    assert verdict["interval"][1] < -0.02 and "general ability lost: hellaswag acc_norm" in verdict["reason"]
    traded = Candidate("q8_0", benchmark_rows=hellaswag_rows(ones(110, total=300)[:290] + [1.0] * 10))
    assert general_guard(traded, reference, GUARD, 0.95)["status"] == "pass"
    small = Candidate("q6_k", benchmark_rows=hellaswag_rows(ones(117, total=300)))  # 1 point: within tolerance
    assert general_guard(small, reference, GUARD, 0.95)["status"] == "pass"
    absent = Candidate("merged", metrics={"benchmarks": {"hellaswag": {"status": "skipped: /x/hs.txt is absent. Get ..."}}},
                       benchmark_rows=[])
    skipped = general_guard(lost, absent, GUARD, 0.95)
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("skipped: /x/hs.txt is absent")


def test_a_build_the_guard_rejects_is_not_eligible():
    rows = {"merged": hellaswag_rows(ones(120, total=300)), "q4_0": hellaswag_rows(ones(104, total=300))}
    reference = Candidate("merged", metrics=merged(ones(40)).metrics, scores=merged(ones(40)).scores,
                          benchmark_rows=rows["merged"])
    q4 = build("q4_0", ones(40))
    verdict = judge(Candidate(q4.name, q4.manifest, q4.metrics, q4.scores, rows["q4_0"]), reference, POLICY)
    assert not verdict.passes and verdict.general_guard["status"] == "rejected"
    assert verdict.reasons == [verdict.general_guard["reason"]]


def test_policy_is_validated():
    with pytest.raises(ParamsError, match=r"promote.policy.direction: expected one of max, min, got 'up'"):
        policy_of({"promote": {"model_name": "x", "policy": {"direction": "up"}}})
    with pytest.raises(ParamsError, match="scored per example"):
        policy_of({"promote": {"model_name": "x", "policy": {"metric": "perplexity"}}})


def test_pref_accuracy_promotes_on_the_held_out_pairs():
    policy = {**POLICY, "metric": "pref_accuracy"}

    def pairs(name, values):
        return build(name, values, key="pref_accuracy", metric="pref_accuracy")

    # q4_0 lost half the pairs: retention 60 %
    decision, report, entered = promote([pairs("q8_0", ones(50, total=60)), pairs("q4_0", ones(30, total=60))],
                                        pairs("merged", ones(50, total=60)), policy=policy)
    rows = by_name(report)
    assert champion_name(decision, entered) == "q8_0"
    assert rows["q4_0"]["status"] == "rejected" and "pref_accuracy retention" in " ".join(rows["q4_0"]["reasons"])
    assert report["paired_examples"] == 60


def test_smallest_tied_promotes_the_smallest_build_tied_with_merged():
    """select: smallest_tied: q4_0 (the smaller) is tied with merged and q8_0 is not significantly better
    than it, so q4_0 is champion and the note says why; when q8_0 is significantly better than q4_0 (and
    tied with merged), the larger build wins, and the note compares it with the champion it replaces."""
    policy = {**POLICY, "select": "smallest_tied", "min_retention": 0.0}
    reference = merged(ones(40))
    builds = [build("q8_0", ones(41)), build("q4_0", ones(38))]
    first, report, entered = promote(builds, reference, policy=policy)
    assert champion_name(first, entered) == "q4_0"
    assert first.note.startswith("first champion: the smallest build tied with merged")
    builds = [build("q8_0", ones(41)), build("q4_0", ones(30))]  # 10 lost: below merged, q8_0 significantly better
    moved, report, entered = promote(builds, reference, first.champion_version, policy)
    assert champion_name(moved, entered) == "q8_0" and report["champion"]["moved"]
    assert moved.note.startswith("q8_0: the smallest build tied with merged")
    assert f"; vs champion version {VERSIONS['q4_0']}: task_json_field_accuracy +0.2292" in moved.note
    still, _, _ = promote(builds, reference, moved.champion_version, policy)
    assert still.moves_to is None and still.note.startswith("the champion is still the pick: the smallest build tied")


def test_smallest_tied_falls_back_to_the_best_when_none_is_tied_with_merged():
    policy = {**POLICY, "select": "smallest_tied", "min_retention": 0.0}
    decision, _, entered = promote([build("q8_0", ones(30)), build("q4_0", ones(20))], merged(ones(N)), policy=policy)
    assert champion_name(decision, entered) == "q8_0"
    assert decision.note == "first champion: no build is tied with merged at 95%: the best by the metric"
