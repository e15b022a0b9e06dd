"""General ability kept after fine-tuning: a few everyday questions the base model answers correctly,
each scored by whether the answer contains one of the expected words (whole word, any case). A
fine-tune that overwrote what the base could do (e.g. answers every question with an introduction)
scores low here while its task metric looks fine; the text perplexity of ftq_text_perplexity (lm-eval)
is the other half of that check. The questions are kept out of the replay data on purpose."""

from __future__ import annotations

import re

from ftq import evidence


def correct(answer: str, expect: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE) for word in expect)


def conversations(questions: list[dict]) -> list[list[dict]]:
    return [[{"role": "user", "content": q["prompt"]}] for q in questions]


def score(questions: list[dict], answers: list[str]) -> tuple[dict, list[dict]]:
    """Each question's answer (to conversations(questions), in order) scored: accuracy with its interval."""
    rows = [{"prompt": q["prompt"], "expect": list(q["expect"]), "answer": answer,
             "correct": float(correct(answer, q["expect"]))} for q, answer in zip(questions, answers, strict=True)]
    if not rows:
        return {}, rows
    values = [r["correct"] for r in rows]
    return {"general_accuracy": round(sum(values) / len(values), 4), "general_accuracy_ci95": evidence.mean_interval(values)["interval"],
            "general_questions": len(rows)}, rows
