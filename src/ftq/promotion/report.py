"""reports/promotion.json: every contender with the reason it was chosen or rejected, the decisive
comparison and where the champion went. Pure: the decision in, a dict out."""

from __future__ import annotations

from ftq.promotion.policy import Candidate, Contender, Decision, versus


def ci_key(name: str, confidence: float) -> str:
    return f"{name}_ci{round(confidence * 100):d}"


def diff_baseline(decision: Decision) -> Contender | None:
    """What each contender's `diff` is measured against: the incumbent it competed with, or the new
    champion where there was none (or the incumbent has no scores on these examples)."""
    champion = next((r.contender for r in decision.ranking if r.version == decision.champion_version), None)
    if decision.incumbent is None:
        return champion
    if decision.incumbent.contender.candidate.scores is None:
        return champion
    return decision.incumbent.contender


def status_of(contender: Contender, decision: Decision, position: dict) -> tuple[str, list[str]]:
    if not contender.passes:
        return "rejected", list(contender.verdict.reasons)
    if contender.version == decision.champion_version:
        return "champion", [decision.note or "best by the policy"]
    status = "challenger" if contender.version == decision.challenger else "eligible"
    return status, [f"ranked {position[contender.version]} by the policy"]


def entry(contender: Contender, decision: Decision, baseline: Contender | None, policy: dict) -> dict:
    """One contender's line: status and reasons, metric, tie-breakers, retention, guard, and its paired
    differences from the best and from the baseline."""
    confidence, metric = float(policy["confidence"]), policy["metric"]
    metrics = contender.candidate.metrics or {}
    position = {r.version: i + 1 for i, r in enumerate(decision.ranking)}
    status, why = status_of(contender, decision, position)
    line = {"name": contender.name, "version": contender.version, "registered_now": contender.registered_now,
            "status": status, "reasons": why, "metric": metrics.get(metric),
            "metric_ci95": metrics.get(f"{metric}_ci95"), "size_bytes": metrics.get("size_bytes")}
    for breaker in policy["tie_breakers"]:
        key = breaker.rsplit(":", 1)[0]
        line.setdefault(key, metrics.get(key))
    if contender.verdict.general_guard:
        line["general_guard"] = contender.verdict.general_guard
    kept = contender.verdict.retention
    if kept:
        line.update(retention=kept["ratio"], **{ci_key("retention", confidence): kept["interval"]})
    ranked = next((r for r in decision.ranking if r.contender is contender), None)
    if ranked is not None:
        line.update(tied_with_best=ranked.tied, diff_vs_best=ranked.vs_best["diff"],
                    **{ci_key("diff_vs_best", confidence): ranked.vs_best["interval"]})
    if baseline is not None and contender.candidate.scores is not None and contender.passes:
        d = versus(contender, baseline, policy, f"{contender.name} vs champion")
        line.update(diff=d["diff"], **{ci_key("diff", confidence): d["interval"]})
    return line


def promotion_report(model_name: str, policy: dict, contenders: list[Contender], decision: Decision,
                     merged: Candidate | None) -> dict:
    confidence, metric = float(policy["confidence"]), policy["metric"]
    champion_version = decision.champion_version
    previous = decision.incumbent.version if decision.incumbent else None
    baseline = diff_baseline(decision)
    previous_ranked = next((r for r in decision.ranking if r.version == previous), None)
    merged_metrics = (merged.metrics if merged else None) or {}
    vs = decision.vs_champion
    return {
        "model_name": model_name,
        "policy": policy,
        # False when the champion kept its alias only because nothing passes the policy now
        "champion_passes_policy": any(r.version == champion_version for r in decision.ranking),
        "merged_metric": merged_metrics.get(metric),
        "merged_metric_ci95": merged_metrics.get(f"{metric}_ci95"),
        "champion": {"version": champion_version, "moved": decision.moves_to is not None, "note": decision.note,
                     "previous": previous,
                     # how the previous champion was scored on this run's examples
                     "previous_evaluation": decision.incumbent.evaluation if decision.incumbent else None,
                     "previous_metric": previous_ranked.contender.candidate.metrics.get(metric)
                     if previous_ranked else None},
        # the decisive paired comparison: the pick (or the runner-up, when the champion stays) minus the champion
        "vs_champion": {"diff": vs["diff"], ci_key("diff", confidence): vs["interval"], "examples": vs["examples"]}
        if vs else None,
        "challenger": decision.challenger,
        # `diff` and its interval in each candidate: the candidate minus this version, example by example
        "diff_against_version": baseline.version if baseline else None,
        "candidates": [entry(c, decision, baseline, policy) for c in contenders],
        # the examples a comparison rests on: those scored on the metric (JSON answers for JSON metrics)
        "paired_examples": next((r.vs_best["examples"] for r in decision.ranking), None),
    }
