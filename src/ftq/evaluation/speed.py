"""Generation speed on a fixed prompt set: time to first token and decode tokens/s, streamed."""

from __future__ import annotations

import time


def measure(runtime, prompts: list[str], max_new_tokens: int, count_tokens) -> dict:
    ttfts, rates, total_tokens, total_seconds = [], [], 0, 0.0
    for prompt in prompts:
        started = time.perf_counter()
        first = None
        text = ""
        for piece in runtime.stream_chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens):
            if first is None:
                first = time.perf_counter()
            text += piece
        ended = time.perf_counter()
        tokens = count_tokens(text)
        if first is None:
            continue
        ttfts.append(first - started)
        if tokens > 1 and ended > first:
            rates.append((tokens - 1) / (ended - first))
        total_tokens += tokens
        total_seconds += ended - started
    ttfts.sort()
    return {
        "ttft_seconds_p50": round(ttfts[len(ttfts) // 2], 4) if ttfts else None,
        "decode_tokens_per_second": round(sum(rates) / len(rates), 2) if rates else None,
        "tokens_per_second": round(total_tokens / total_seconds, 2) if total_seconds else None,
        "generated_tokens": total_tokens,
    }
