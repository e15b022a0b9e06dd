"""The quality check every build must pass before it is kept: it loads with its own runtime, answers a
fixed prompt with text that is not degenerate (unless the merged model's answer is too), and its
next-token distribution stays close to the merged model's (ftq.quantize.distance): mean and p99 KL
divergence under their limits, top-1 agreement above its floor."""

from __future__ import annotations

import math

from ftq.quantize.calibration import Sequences


class BuildCheckError(RuntimeError):
    """A build failed its check: load, coherent reply, or distance from merged."""


def perplexity(runtime, sequences: Sequences) -> float:
    """exp(mean NLL) over the scored tokens of `sequences` (evaluate's held-out perplexity)."""
    total, count = 0.0, 0
    targets = sequences.targets or [None] * len(sequences.ids)
    for ids, scored in zip(sequences.ids, targets):
        nll, n = runtime.sequence_nll(ids, scored)
        total += nll
        count += n
    return math.exp(total / count)


def degenerate(text: str) -> str | None:
    """Why a reply is not coherent text, or None: empty, mostly unprintable, or looping."""
    if not text.strip():
        return "empty reply"
    printable = sum(ch.isprintable() or ch.isspace() for ch in text) / len(text)
    if printable < 0.9 or "\ufffd" in text:
        return "unprintable characters"
    words = text.split()
    if len(words) >= 8:
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(set(grams)) / len(grams) < 0.5:
            return "the reply loops"
    return None


def judge(reply: str, merged_reply: str, measured: dict, check: dict) -> dict:
    """A build's reply and distance from merged against the check's limits; `passed` and what failed."""
    failures = []
    reason = degenerate(reply)
    if reason and not degenerate(merged_reply):
        failures.append(f"reply to the check prompt is not coherent ({reason}): {reply[:120]!r}")
    limits = [("kld_mean", "mean KL divergence", "max_kld_mean", max), ("kld_p99", "p99 KL divergence", "max_kld_p99", max),
              ("top1_agreement", "top-1 agreement", "min_top1_agreement", min)]
    for key, label, limit, kind in limits:
        value, bound = measured[key], float(check[limit])
        if not math.isfinite(value) or (value > bound if kind is max else value < bound):
            failures.append(f"{label} {value:.4g} vs merged, allowed {'at most' if kind is max else 'at least'} "
                            f"{bound:g} (quantize.check.{limit})")
    return {**measured, "passed": not failures, "failures": failures, "reply": reply, "merged_reply": merged_reply,
            "limits": {limit: float(check[limit]) for _, _, limit, _ in limits}}
