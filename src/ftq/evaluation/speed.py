"""Generation speed on a fixed prompt set, at a fixed answer length: time to first token and decode
tokens/s, each candidate measured beside merged in the same run."""

from __future__ import annotations

import time


def measure(runtime, prompts: list[str], tokens: int) -> dict:
    """Each prompt answered with exactly `tokens` tokens (the end of sequence ignored), so a model with
    shorter answers does not look slower: decode tokens/s is (tokens - 1) over the time after the
    first token, by the runtime's own token count; time to first token (prefill) is reported apart."""
    ttfts, rates, total_tokens = [], [], 0
    for prompt in prompts:
        timed = runtime.timed_generation([{"role": "user", "content": prompt}], tokens)
        if timed["tokens"] != tokens:
            raise RuntimeError(f"{runtime.path}: generated {timed['tokens']} tokens where {tokens} were asked")
        ttfts.append(timed["ttft_seconds"])
        rates.append((timed["tokens"] - 1) / timed["decode_seconds"])
        total_tokens += timed["tokens"]
    ttfts.sort()
    return {
        "ttft_seconds_p50": round(ttfts[len(ttfts) // 2], 4),
        # decode only (after the first token), mean over the prompts
        "tokens_per_second": round(sum(rates) / len(rates), 2),
        "generated_tokens": total_tokens,
    }


def _measured(open_model, prompts: list[str], max_new_tokens: int) -> dict:
    from ftq.memory import release

    runtime = open_model()
    try:
        runtime.chat([{"role": "user", "content": "Hi"}], max_new_tokens=1)  # load (llama.cpp maps on first use)
        return measure(runtime, prompts, max_new_tokens)
    finally:
        runtime.close()
        del runtime
        release()


def measure_relative(open_candidate, open_reference, prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    """`repeats` measurements of the candidate, each followed by one of a reference model (merged, in
    transformers) on the same prompts: absolute speed changes 2-4x with machine load, the paired ratio
    much less, so candidates are compared on `relative_tokens_per_second` (median of the per-repeat
    ratios). `open_reference` is None when the candidate is the reference itself (ratio 1).

    One model is in memory at a time: each measurement opens its model, warms it with one token and
    closes it. Weights are mapped from the page cache, so reopening costs about a second, while holding
    both would double the stage's memory (a 70B merged model beside its build does not fit anywhere)."""
    from statistics import median

    mine, theirs = [], []
    for _ in range(repeats):
        mine.append(_measured(open_candidate, prompts, max_new_tokens))
        if open_reference is not None:
            theirs.append(_measured(open_reference, prompts, max_new_tokens))
    theirs = theirs or mine
    speeds = [m["tokens_per_second"] for m in mine if m["tokens_per_second"]]
    reference_speeds = [m["tokens_per_second"] for m in theirs if m["tokens_per_second"]]
    ratios = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(mine, theirs)
              if a["tokens_per_second"] and b["tokens_per_second"]]

    def mid(key: str):
        values = [m[key] for m in mine if m[key] is not None]
        return round(median(values), 4) if values else None

    return {
        "ttft_seconds_p50": mid("ttft_seconds_p50"),
        # decode tokens/s at a fixed answer length (speed_max_new_tokens, end of sequence ignored)
        "tokens_per_second": round(median(speeds), 2) if speeds else None,
        "tokens_per_second_runs": speeds,
        # (max - min) / median over the repeats: how much the machine moved the absolute figure
        "tokens_per_second_spread": round((max(speeds) - min(speeds)) / median(speeds), 3) if speeds else None,
        "reference_tokens_per_second": round(median(reference_speeds), 2) if reference_speeds else None,
        "relative_tokens_per_second": round(median(ratios), 3) if ratios else None,
        "relative_tokens_per_second_runs": [round(r, 3) for r in ratios],
        "speed_repeats": repeats,
        "speed_answer_tokens": max_new_tokens,
        "generated_tokens": mine[0]["generated_tokens"] if mine else 0,
    }
