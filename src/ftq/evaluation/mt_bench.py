"""MT-Bench single-answer grading with FastChat's data and judge prompts, driven by the maintained
`openai` client against any OpenAI-compatible judge endpoint (FastChat's own judge code needs openai<1).

Files (FastChat's formats, from `evaluate.mt_bench.path`):
  question.jsonl                    {"question_id", "category", "turns": [t1, t2]}
  reference_answer/gpt-4.jsonl      {"question_id", "choices": [{"turns": [r1, r2]}]}  (or reference_answer_gpt-4.jsonl)
  judge_prompts.jsonl               {"name", "system_prompt", "prompt_template", "output_format"}

The candidate answers both turns with its own chat template. Each turn is judged once with
single-v1 / single-v1-multi-turn, or single-math-v1 / single-math-v1-multi-turn with the reference
answer for math, reasoning and coding (FastChat's NEED_REF_CATS). The `[[rating]]` is parsed from the
judge's text; a reply without one is retried, then counted as a failure, never guessed."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


class MTBenchError(ValueError):
    pass


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise MTBenchError(f"{path}: line {number}: invalid JSON: {exc}") from exc
    return rows


def load(folder: Path, limit: int = 0) -> tuple[list[dict], dict[int, list[str]], dict[str, dict]]:
    folder = Path(folder)
    questions_path = folder / "question.jsonl"
    if not questions_path.exists():
        raise FileNotFoundError(f"{questions_path}: no MT-Bench questions (evaluate.mt_bench.path)")
    questions = read_jsonl(questions_path)
    for number, q in enumerate(questions):
        for field in ("question_id", "category", "turns"):
            if field not in q:
                raise MTBenchError(f"{questions_path}: record {number}: field '{field}': missing")
    if limit:
        questions = questions[:limit]
    reference_path = next((p for p in (folder / "reference_answer" / "gpt-4.jsonl", folder / "reference_answer_gpt-4.jsonl")
                           if p.exists()), None)
    references = {}
    if reference_path is not None:
        references = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(reference_path)}
    prompts = {p["name"]: p for p in read_jsonl(folder / "judge_prompts.jsonl")}
    for name in ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"):
        if name not in prompts:
            raise MTBenchError(f"{folder / 'judge_prompts.jsonl'}: judge prompt '{name}' is missing")
    return questions, references, prompts


def judge_prompt(prompts: dict, question: dict, answers: list[str], turn: int, reference: list[str] | None) -> tuple[str, str]:
    """(system prompt, user prompt) for judging `turn` (0 or 1), as FastChat's single-answer grading."""
    math = question["category"] in NEED_REF_CATS and reference is not None
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 1 else "")
    template = prompts[name]
    values = {"question": question["turns"][0], "answer": answers[0]}
    if turn == 1:
        values = {"question_1": question["turns"][0], "question_2": question["turns"][1],
                  "answer_1": answers[0], "answer_2": answers[1]}
    if math:
        if turn == 1:
            values.update(ref_answer_1=reference[0], ref_answer_2=reference[1])
        else:
            values["ref_answer_1"] = reference[0]
    return template["system_prompt"], template["prompt_template"].format(**values)


def parse_rating(text: str) -> float | None:
    match = RATING.search(text) or RATING_FALLBACK.search(text)
    if not match:
        return None
    value = float(match.group(1))
    return value if 0 <= value <= 10 else None


class Judge:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, retries: int = 2,
                 max_tokens: int = 512, timeout: float = 300):
        from openai import OpenAI

        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.model = model
        self.retries = retries
        self.max_tokens = max_tokens
        self.client = OpenAI(base_url=base_url, api_key=key or "none", timeout=timeout, max_retries=1)

    def rate(self, system: str, prompt: str) -> dict:
        attempts = []
        for _ in range(self.retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, temperature=0, max_tokens=self.max_tokens,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}])
                text = reply.choices[0].message.content or ""
            except Exception as exc:  # network or server errors count as a failed attempt
                text = f"<error: {exc}>"
            attempts.append(text)
            rating = parse_rating(text)
            if rating is not None:
                return {"rating": rating, "judgment": text, "attempts": len(attempts)}
        return {"rating": None, "judgment": attempts[-1], "attempts": len(attempts)}


def run(runtime, folder: Path, judge: Judge, limit: int = 0, max_new_tokens: int = 512) -> tuple[dict, list[dict]]:
    questions, references, prompts = load(folder, limit)
    rows = []
    started = time.time()
    for question in questions:
        history, answers = [], []
        for text in question["turns"][:2]:
            history.append({"role": "user", "content": text})
            answer = runtime.chat(history, max_new_tokens=max_new_tokens)
            history.append({"role": "assistant", "content": answer})
            answers.append(answer)
        for turn in range(len(answers)):
            system, prompt = judge_prompt(prompts, question, answers, turn, references.get(question["question_id"]))
            rows.append({"question_id": question["question_id"], "category": question["category"], "turn": turn + 1,
                         "answers": answers, **judge.rate(system, prompt)})
    return summarize(rows, time.time() - started), rows


def summarize(rows: list[dict], seconds: float) -> dict:
    rated = [r for r in rows if r["rating"] is not None]
    by_category: dict[str, list[float]] = {}
    for r in rated:
        by_category.setdefault(r["category"], []).append(r["rating"])

    def mean(values):
        return round(sum(values) / len(values), 3) if values else None

    return {
        "mt_bench_score": mean([r["rating"] for r in rated]),
        "mt_bench_turn1": mean([r["rating"] for r in rated if r["turn"] == 1]),
        "mt_bench_turn2": mean([r["rating"] for r in rated if r["turn"] == 2]),
        "mt_bench_judged": len(rated),
        "mt_bench_failed": len(rows) - len(rated),
        "mt_bench_categories": {c: mean(v) for c, v in sorted(by_category.items())},
        "mt_bench_seconds": round(seconds, 1),
    }
