"""The smallest-faithful-build rule and the ladder's walk, on made-up per-example scores (milliseconds:
no models, no MLflow, no files)."""

from ftq import selection
from ftq.stages.ladder import walk

POLICY = {"metric": "task_json_field_accuracy", "direction": "max", "confidence": 0.95}
N = 80


def span(name: str, size: int, start: int, stop: int) -> dict:
    """Examples start..stop-1 right, the others wrong."""
    return {"name": name, "size_bytes": size,
            "scores": {str(i): {"json_field_accuracy": float(start <= i < stop)} for i in range(N)}}


def nested(name: str, size: int, right: int) -> dict:
    """The first `right` examples right: builds that differ only by how many more they get right, so a
    paired comparison sees every difference."""
    return span(name, size, 0, right)


MERGED = nested("merged", 500, 64)


def test_the_smallest_build_tied_with_merged_is_chosen_over_a_larger_tied_one():
    q8, q4, q3 = nested("q8_0", 300, 64), nested("q4_k_m", 150, 63), nested("q3_k_m", 110, 40)
    pick, why = selection.smallest_tied([q8, q4, q3], MERGED, POLICY)
    assert pick["name"] == "q4_k_m" and why.startswith("the smallest build tied with merged")
    assert not selection.vs_merged(q3, MERGED, POLICY)["tied"]  # q3 is significantly below merged


def test_a_larger_build_significantly_better_than_every_smaller_one_wins():
    # q3 is tied with merged on a wide interval; q4 is tied too and significantly better than q3
    merged = nested("merged", 500, 50)
    q3, q4 = span("q3_k_m", 110, 4, 54), nested("q4_k_m", 150, 70)  # q3: 4 lost and 4 gained vs merged
    assert selection.vs_merged(q3, merged, POLICY)["tied"]
    pick, why = selection.smallest_tied([q3, q4], merged, POLICY)
    assert pick["name"] == "q4_k_m" and why.startswith("significantly better than every smaller build")


def test_a_larger_build_merely_better_does_not_replace_the_smaller_tied_one():
    q3, q4 = nested("q3_k_m", 110, 63), nested("q4_k_m", 150, 64)
    assert selection.smallest_tied([q4, q3], MERGED, POLICY)[0]["name"] == "q3_k_m"


def test_no_build_tied_with_merged_leaves_the_choice_to_the_ranking():
    pick, why = selection.smallest_tied([nested("q2_k", 80, 30), nested("q3_k_m", 110, 35)], MERGED, POLICY)
    assert pick is None and why == "no build is tied with merged at 95%"


def test_min_direction_flips_better_and_worse():
    policy = {**POLICY, "direction": "min"}  # fewer "right" is better here
    assert selection.vs_merged(nested("x", 1, 40), MERGED, policy)["tied"]
    assert not selection.vs_merged(nested("x", 1, 80), MERGED, policy)["tied"]


def rungs(*specs):
    return [{"name": n, "size_bytes": size, "screen_passed": passed, "screen_failures": [] if passed else ["KLD"],
             "evaluated": False} for n, size, passed in specs]


class Calls:
    """The walk's I/O, recorded: quick(name) and full(name) answer from set verdicts."""

    def __init__(self, quick_tied: dict, full_verdicts: dict, diffs: dict | None = None):
        self.quick_tied, self.full_verdicts, self.diffs = quick_tied, full_verdicts, diffs or {}
        self.quick_calls, self.full_calls = [], []

    def quick(self, name):
        self.quick_calls.append(name)
        return {"tied": self.quick_tied[name], "diff": self.diffs.get(name, 0.0)}

    def full(self, name):
        self.full_calls.append(name)
        return self.full_verdicts[name]


def test_a_build_that_fails_its_screen_is_never_evaluated_and_the_walk_stops_at_the_first_tied_build():
    ladder = rungs(("q8_0", 300, True), ("q2_k", 80, False), ("q3_k_m", 110, True), ("q4_k_m", 150, True))
    calls = Calls({"q3_k_m": False, "q4_k_m": True, "q8_0": True},
                  {"q4_k_m": {"eligible": True, "tied": True}, "q8_0": {"eligible": True, "tied": True}})
    done = {r["name"]: r for r in walk(ladder, calls.quick, calls.full, "smallest_tied")}
    assert calls.quick_calls == ["q3_k_m", "q4_k_m"] and calls.full_calls == ["q4_k_m"]
    assert not done["q2_k"]["evaluated"] and done["q2_k"]["why"] == "failed its screen: KLD"
    assert done["q3_k_m"]["why"] == "not evaluated in full: not tied with merged on the metric"
    assert done["q8_0"]["why"] == "not evaluated: q4_k_m, a smaller build, is tied with merged"
    assert done["q4_k_m"]["evaluated"] and not done["q8_0"]["evaluated"]


def test_a_tied_build_the_policy_rejects_does_not_stop_the_walk():
    ladder = rungs(("q3_k_m", 110, True), ("q4_k_m", 150, True))
    calls = Calls({"q3_k_m": True, "q4_k_m": True},
                  {"q3_k_m": {"eligible": False, "tied": True}, "q4_k_m": {"eligible": True, "tied": True}})
    walk(ladder, calls.quick, calls.full, "smallest_tied")
    assert calls.full_calls == ["q3_k_m", "q4_k_m"]


def test_when_no_build_is_tied_the_best_on_the_metric_is_evaluated_in_full():
    ladder = rungs(("q3_k_m", 110, True), ("q4_k_m", 150, True), ("q8_0", 300, True))
    calls = Calls({"q3_k_m": False, "q4_k_m": False, "q8_0": False}, {"q4_k_m": {"eligible": True, "tied": False}},
                  diffs={"q3_k_m": -0.2, "q4_k_m": -0.05, "q8_0": -0.06})
    done = {r["name"]: r for r in walk(ladder, calls.quick, calls.full, "smallest_tied")}
    assert calls.full_calls == ["q4_k_m"] and done["q4_k_m"]["evaluated"] and "why" not in done["q4_k_m"]


def test_select_best_evaluates_every_build_that_passed_its_screen_in_full():
    ladder = rungs(("q8_0", 300, True), ("q2_k", 80, False), ("q4_k_m", 150, True))
    calls = Calls({}, {"q4_k_m": {"eligible": True, "tied": True}, "q8_0": {"eligible": True, "tied": True}})
    walk(ladder, calls.quick, calls.full, "best")
    assert calls.quick_calls == [] and calls.full_calls == ["q4_k_m", "q8_0"]


def test_no_extra_full_evaluation_when_the_best_on_the_metric_is_evaluated_already():
    # q4_k_m is tied on the metric but fails the policy in full (e.g. the general-ability guard); q8_0 is
    # worse on the metric: nothing more is evaluated, and promote ranks what was evaluated
    ladder = rungs(("q4_k_m", 150, True), ("q8_0", 300, True))
    calls = Calls({"q4_k_m": True, "q8_0": False}, {"q4_k_m": {"eligible": False, "tied": True}},
                  diffs={"q4_k_m": -0.01, "q8_0": -0.1})
    walk(ladder, calls.quick, calls.full, "smallest_tied")
    assert calls.quick_calls == ["q4_k_m", "q8_0"] and calls.full_calls == ["q4_k_m"]
