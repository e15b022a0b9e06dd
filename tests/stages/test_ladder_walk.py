"""Stage ladder's walk without models: fixed-sequence testing over the screened builds, largest first,
stopping at the first build not shown faithful (ftq.stages.ladder.walk and annotate; the tests' I/O is
the caller's, given here)."""

from ftq import schema
from ftq.stages.ladder import annotate, walk

POLICY = schema.defaults("promote")["policy"]


def rungs(*specs):
    return [{"name": n, "size_bytes": size, "type": n.replace("_no_imatrix", ""), "imatrix": "no_imatrix" not in n,
             "screen_passed": passed, "screen_failures": [] if passed else ["KLD"],
             "evaluated": False} for n, size, passed in specs]


class Tests:
    """Set outcomes per build, and the order in which the walk asked for them."""

    def __init__(self, outcomes):
        self.outcomes, self.asked = outcomes, []

    def __call__(self, name):
        self.asked.append(name)
        return {"outcome": self.outcomes[name], "p_value": 0.01 if self.outcomes[name] == "faithful" else 0.3}


def test_the_walk_tests_largest_first_and_stops_at_the_first_build_not_shown_faithful():
    ladder = rungs(("q8_0", 300, True), ("q2_k", 80, True), ("q3_k_m", 110, False), ("q4_k_m", 150, True),
                   ("q4_k_m_no_imatrix", 149, True))
    tests = Tests({"q8_0": "faithful", "q4_k_m": "faithful", "q4_k_m_no_imatrix": "inconclusive", "q2_k": "faithful"})
    walked = walk(ladder, tests, POLICY)
    assert walked["order"] == ["q8_0", "q4_k_m", "q4_k_m_no_imatrix", "q2_k"]  # the screened builds, largest first
    assert tests.asked == ["q8_0", "q4_k_m", "q4_k_m_no_imatrix"]  # q2_k is never tested, faithful or not
    assert walked["pick"] == "q4_k_m" and walked["stopped_at"] == "q4_k_m_no_imatrix"
    assert "fixed-sequence" in walked["procedure"]
    done = {r["name"]: r for r in annotate(ladder, walked)}
    assert done["q3_k_m"]["why"].startswith("failed its screen")
    assert done["q2_k"]["why"].startswith("not tested: the walk stopped at q4_k_m_no_imatrix")
    assert done["q4_k_m"]["test"]["outcome"] == "faithful"


def test_a_first_build_not_shown_faithful_ships_nothing():
    tests = Tests({"q8_0": "inconclusive", "q4_k_m": "faithful"})
    walked = walk(rungs(("q8_0", 300, True), ("q4_k_m", 150, True)), tests, POLICY)
    assert walked["pick"] is None and tests.asked == ["q8_0"]


def test_every_build_faithful_ships_the_smallest():
    tests = Tests({"q8_0": "faithful", "q4_k_m": "faithful"})
    walked = walk(rungs(("q8_0", 300, True), ("q4_k_m", 150, True)), tests, POLICY)
    assert walked["pick"] == "q4_k_m" and walked["stopped_at"] is None
