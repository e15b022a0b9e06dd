"""General ability kept after fine-tuning: a few everyday questions the base model answers correctly,
each scored by whether the answer contains one of the expected words (whole word, any case). A
fine-tune that overwrote what the base could do (e.g. answers every question with an introduction)
scores low here while its task metric looks fine; the text perplexity of ftq_text_perplexity (lm-eval)
is the other half of that check. The questions are kept out of the replay data on purpose."""

from __future__ import annotations

import re

from ftq.evaluation.task import interval


def correct(answer: str, expect: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE) for word in expect)


def run(runtime, questions: list[dict], max_new_tokens: int) -> tuple[dict, list[dict]]:
    rows = []
    for question in questions:
        answer = runtime.chat([{"role": "user", "content": question["prompt"]}], max_new_tokens=max_new_tokens)
        rows.append({"prompt": question["prompt"], "expect": list(question["expect"]), "answer": answer,
                     "correct": float(correct(answer, question["expect"]))})
    if not rows:
        return {}, rows
    values = [r["correct"] for r in rows]
    return {"general_accuracy": round(sum(values) / len(values), 4), "general_accuracy_ci95": interval(values),
            "general_questions": len(rows)}, rows
