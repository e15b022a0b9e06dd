"""MT-Bench against a real judge: `ftq serve` on loopback serving a tiny model that answers every judge
prompt with a rating, driven through the openai client; scores parsed from its real text."""

import json
import os

import pytest

from conftest import SMALL_EVAL, load_params, set_params, shared_file, start_server, stop
from ftq.evaluation import mt_bench
from ftq.stages import evaluate
from ftq.layout import eval_dir as report_dir


def test_parse_rating_like_fastchat():
    assert mt_bench.parse_rating("The answer is fine. Rating: [[8]]") == 8.0
    assert mt_bench.parse_rating("Rating: [[7.5]]") == 7.5
    assert mt_bench.parse_rating("Rating: [6]") == 6.0
    assert mt_bench.parse_rating("I would say seven") is None
    assert mt_bench.parse_rating("[[42]]") is None


def test_judge_prompts_use_references_for_math(tmp_path):
    folder = shared_file("mt_bench")
    questions, references, prompts = mt_bench.load(folder)
    assert len(questions) == 80 and len(references) >= 30
    math = next(q for q in questions if q["category"] == "math")
    system, prompt = mt_bench.judge_prompt(prompts, math, ["a1", "a2"], 1, references[math["question_id"]])
    assert references[math["question_id"]][1] in prompt and "a2" in prompt and "[[" in system + prompt
    writing = next(q for q in questions if q["category"] == "writing")
    _, prompt = mt_bench.judge_prompt(prompts, writing, ["a1"], 0, None)
    assert writing["turns"][0] in prompt and "a1" in prompt


@pytest.fixture()
def judge_server(rating_judge_dir):
    process, port, _ = start_server(str(rating_judge_dir))
    yield f"http://127.0.0.1:{port}/v1"
    stop(process)


def test_evaluate_runs_mt_bench_with_a_real_judge_endpoint(evaluated, judge_server, monkeypatch):
    folder = shared_file("mt_bench", "question.jsonl").parent
    project, _ = evaluated
    monkeypatch.chdir(project)
    set_params(project, evaluate={"mt_bench": {"path": str(folder), "limit": 3, "max_new_tokens": 8,
                                                "judge": {"base_url": judge_server, "model": "rating-judge",
                                                          "api_key_env": "NO_SUCH_KEY"}},
                                  "lm_eval": {"tasks": [], "local_data": {}}})  # measured by the fixture already
    outputs = [project / report_dir("q8_0") / f"q8_0{suffix}" for suffix in (".json", ".answers.jsonl")]
    outputs += [project / report_dir("q8_0") / "lm_eval" / f"q8_0{suffix}" for suffix in (".json", ".samples.jsonl")]
    saved = [p.read_bytes() for p in outputs]  # the shared fixture's other tests read the originals
    try:
        report = evaluate.run(load_params(project), "q8_0")
    finally:
        set_params(project, evaluate={"mt_bench": {}, "lm_eval": SMALL_EVAL["lm_eval"]})
        for path, content in zip(outputs, saved):
            path.write_bytes(content)
    assert report["mt_bench_status"] == "ok" and report["mt_bench_judged"] == 6 and report["mt_bench_failed"] == 0
    assert report["mt_bench_score"] == 7.0 and report["mt_bench_turn2"] == 7.0
    assert set(report["mt_bench_categories"]) == {"writing"}
    rows = [json.loads(line) for line in (project / report_dir("q8_0") / "q8_0.mt_bench.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("[[7]]" in r["judgment"] for r in rows) and len(rows[0]["answers"]) == 2


def test_without_a_judge_mt_bench_is_reported_skipped(evaluated, monkeypatch):
    project, reports = evaluated
    assert reports["merged"]["mt_bench_status"].startswith("skipped: no questions configured")
    assert "mt_bench_score" not in reports["merged"]
    assert "skipped" in (project / "reports" / "compare.md").read_text()
