"""The quality check every build must pass before it is kept: it loads with its own runtime, answers a
fixed prompt with text that is not degenerate (unless the merged model's answer is too), and its
perplexity on held-out data stays within a ratio of the merged model's."""

from __future__ import annotations

import math
import time

from ftq.quantize.calibration import Sequences


class BuildCheckError(RuntimeError):
    """A build failed its load / generate / perplexity check."""


def perplexity(runtime, sequences: Sequences) -> float:
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


def measure(runtime, sequences: Sequences, prompt: str, max_new_tokens: int) -> dict:
    started = time.time()
    reply = runtime.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)
    generate_seconds = time.time() - started
    started = time.time()
    ppl = perplexity(runtime, sequences)
    return {"reply": reply, "perplexity": ppl, "generate_seconds": round(generate_seconds, 3),
            "perplexity_seconds": round(time.time() - started, 3)}


def judge(build: dict, reference: dict, max_ratio: float) -> dict:
    """Compare a build's measurements with the merged model's; `passed` and the reasons it failed."""
    failures = []
    reason = degenerate(build["reply"])
    if reason and not degenerate(reference["reply"]):
        failures.append(f"reply to the check prompt is not coherent ({reason}): {build['reply'][:120]!r}")
    ratio = build["perplexity"] / reference["perplexity"] if reference["perplexity"] else float("inf")
    if not math.isfinite(build["perplexity"]) or ratio > max_ratio:
        failures.append(f"perplexity {build['perplexity']:.3f} is {ratio:.3f}x the merged model's "
                        f"{reference['perplexity']:.3f} (allowed: {max_ratio}x)")
    return {"passed": not failures, "failures": failures, "perplexity_ratio": ratio,
            "reply": build["reply"], "merged_reply": reference["reply"], "perplexity": build["perplexity"],
            "merged_perplexity": reference["perplexity"], "max_perplexity_ratio": max_ratio}
