"""reports/promotion.json: every contender with the reason it was chosen or rejected, the tests behind it
(margin, one-sided bound, p-value, outcome, examples), the procedure that shared the error budget and where
the champion went. Pure: the decision in, a dict out."""

from __future__ import annotations

from ftq.promotion.policy import Candidate, Contender, Decision

TEST_KEYS = ("outcome", "diff", "lower", "upper", "margin", "margin_scale", "confidence", "p_value", "test",
             "examples", "wins", "losses", "needed_examples", "note", "task", "metric", "tolerance", "items",
             "reason", "better")


def ci_key(name: str, confidence: float) -> str:
    return f"{name}_ci{round(confidence * 100):d}"


def test_summary(test: dict | None) -> dict | None:
    """A test's numbers a reader checks (ftq.evidence's result without its internals)."""
    return {k: test[k] for k in TEST_KEYS if k in test} if test else None


def status_of(contender: Contender, decision: Decision, position: dict) -> tuple[str, list[str]]:
    if not contender.passes:
        return "rejected", list(contender.verdict.reasons)
    if contender.version == decision.champion_version:
        return "champion", [decision.note or "best by the policy"]
    status = "challenger" if contender.version == decision.challenger else "eligible"
    return status, [f"ranked {position[contender.version]} by the policy"]


def entry(contender: Contender, decision: Decision, policy: dict, walk_tests: dict[str, dict]) -> dict:
    """One contender's line: status and reasons, metric and the examples it was scored on, tie-breakers,
    the non-inferiority test on the metric and the guard's (from its full evaluation, or from the ladder's
    walk where it was tested there only)."""
    metric = policy["metric"]
    metrics = contender.candidate.metrics or {}
    position = {r.version: i + 1 for i, r in enumerate(decision.ranking)}
    status, why = status_of(contender, decision, position)
    walked = walk_tests.get(contender.name) or {}
    if policy["select"] == "smallest_faithful" and walked.get("outcome") == "faithful" \
            and contender.candidate.metrics is None:
        # shown faithful in the walk, which went on to a smaller build: not evaluated in full, not registered
        status, why = "faithful, not the smallest", ["shown faithful in the ladder's walk; a smaller build was "
                                                      "shown faithful after it (reports/ladder.json)"]
    line = {"name": contender.name, "version": contender.version, "registered_now": contender.registered_now,
            "status": status, "reasons": why, "metric": metrics.get(metric),
            "metric_ci95": metrics.get(f"{metric}_ci95"), "metric_examples": metrics.get(f"{metric}_examples"),
            "size_bytes": metrics.get("size_bytes") or contender.candidate.size_bytes or None,
            "metric_test": test_summary(contender.verdict.metric_test or walked.get("metric_test")),
            "general_guard": test_summary(contender.verdict.general_guard or walked.get("general_guard"))}
    if walked and not contender.verdict.metric_test:
        line["tested_in"] = "the ladder's walk (reports/ladder.json); not evaluated in full"
    for breaker in policy["tie_breakers"]:
        key = breaker.rsplit(":", 1)[0]
        line.setdefault(key, metrics.get(key))
    ranked = next((r for r in decision.ranking if r.contender is contender), None)
    if ranked is not None and ranked.vs_best:
        line.update(not_beaten_by_best=ranked.tied, vs_best=test_summary(ranked.vs_best))
    return line


def promotion_report(model_name: str, policy: dict, contenders: list[Contender], decision: Decision,
                     merged: Candidate | None, walk_tests: dict[str, dict] | None = None) -> dict:
    metric = policy["metric"]
    champion_version = decision.champion_version
    previous = decision.incumbent.version if decision.incumbent else None
    merged_metrics = (merged.metrics if merged else None) or {}
    vs = decision.vs_champion
    incumbent = decision.incumbent.contender if decision.incumbent else None
    return {
        "model_name": model_name,
        "policy": policy,
        # how several builds shared one error budget (fixed-sequence or Holm)
        "procedure": decision.procedure,
        # False when the champion kept its alias only because nothing passes the policy now
        "champion_passes_policy": any(r.version == champion_version for r in decision.ranking),
        "merged_metric": merged_metrics.get(metric),
        "merged_metric_ci95": merged_metrics.get(f"{metric}_ci95"),
        "merged_metric_examples": merged_metrics.get(f"{metric}_examples"),
        "champion": {"version": champion_version, "moved": decision.moves_to is not None, "note": decision.note,
                     "previous": previous,
                     # how the previous champion was scored on this run's examples
                     "previous_evaluation": decision.incumbent.evaluation if decision.incumbent else None,
                     "previous_metric": (incumbent.candidate.metrics or {}).get(metric) if incumbent else None,
                     "previous_tests": {"metric_test": test_summary(incumbent.verdict.metric_test),
                                        "general_guard": test_summary(incumbent.verdict.general_guard),
                                        "reasons": incumbent.verdict.reasons} if incumbent else None},
        # the decisive paired comparison of the pick with the champion (superiority), where one was made
        "vs_champion": test_summary(vs) if vs else None,
        "challenger": decision.challenger,
        "candidates": [entry(c, decision, policy, walk_tests or {}) for c in contenders],
    }
