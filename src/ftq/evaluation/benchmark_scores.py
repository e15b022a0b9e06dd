"""A local standard task's scores for one candidate (reports/eval/<candidate>.json `benchmarks`): each
metric's mean over the sampled items with its interval, and the paired difference against merged on the
same items, described (ftq.evidence.difference: interval and p-value); the general-ability guard decides
on the same items by non-inferiority (ftq.promotion.policy.guard_test). Pure: rows in, numbers out."""

from __future__ import annotations

from ftq import evidence


def per_item(rows: list[dict], task: str, metric: str) -> dict[int, float]:
    """{doc_id: metric} of one task's rows in an lm-eval samples file."""
    return {int(r["doc_id"]): float(r[metric]) for r in rows if r.get("task") == task and metric in r}


def vs_merged(mine: dict[int, float], theirs: dict[int, float], confidence: float, where: str) -> dict:
    """The paired difference mine - merged over the same items ({diff, interval, p_value, test, examples});
    the item sets must be equal (evidence.pair says which differ)."""
    a, b = evidence.pair({i: {"v": v} for i, v in mine.items()}, {i: {"v": v} for i, v in theirs.items()}, "v",
                         where)
    return evidence.difference(a, b, confidence)


def summary(rows: list[dict], task: str, metrics: list[str], merged_rows: list[dict] | None,
            confidence: float) -> dict:
    """{metric: {mean, interval, examples, method, vs_merged: {diff, interval, p_value, ...}}}; vs_merged is
    left out when the candidate is merged itself (merged_rows None)."""
    out = {}
    for metric in metrics:
        mine = per_item(rows, task, metric)
        if not mine:
            raise evidence.PairingError(f"{task}: no per-item '{metric}' in the samples")
        ids = sorted(mine)
        scores = evidence.mean_interval([mine[i] for i in ids], confidence)
        if merged_rows is not None:
            scores["vs_merged"] = vs_merged(mine, per_item(merged_rows, task, metric), confidence,
                                            f"{task} {metric} vs merged")
        out[metric] = scores
    return out


def flat(task: str, metrics: dict) -> dict[str, float]:
    """The numbers of `summary` as flat keys for MLflow and compare (lm_eval_<task>_<metric> itself is
    lm-eval's own value, flattened by ftq.evaluation.harness)."""
    values = {}
    for metric, s in metrics.items():
        key = f"lm_eval_{task}_{metric}"
        values[f"{key}_low"], values[f"{key}_high"] = s["interval"]
        if "vs_merged" in s:
            values[f"{key}_vs_merged"] = s["vs_merged"]["diff"]
            values[f"{key}_vs_merged_low"], values[f"{key}_vs_merged_high"] = s["vs_merged"]["interval"]
            values[f"{key}_vs_merged_p"] = s["vs_merged"]["p_value"]
    return values
