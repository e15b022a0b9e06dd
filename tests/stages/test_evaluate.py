import json

import pytest

from conftest import load_params, make_project, mlflow_runs, set_params
from ftq.stages import base, compare, evaluate, merge, prepare, quantize, train

SMALL_EVAL = {"task_examples": 4, "max_new_tokens": 8, "perplexity_examples": 4, "perplexity_max_length": 96,
              "speed_prompts": ["Who are you?", "Hello"], "speed_max_new_tokens": 8}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    """A tiny project with base, merged and one GGUF build, each evaluated, then compared."""
    import os

    project = make_project(tmp_path_factory.mktemp("evaluate") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
            patch.delenv(key, raising=False)
        patch.chdir(project)
        set_params(project, train={"max_steps": 2, "per_device_batch_size": 4, "eval_steps": 0, "save_steps": 2,
                                   "warmup": 0},
                   quantize={"enabled": ["q8_0"], "check": {"heldout_examples": 4, "heldout_max_length": 96,
                                                             "max_new_tokens": 8, "prompt": "Who are you?",
                                                             "max_perplexity_ratio": 1.5}},
                   evaluate=SMALL_EVAL)
        params = load_params(project)
        for stage in (base, prepare, train, merge):
            stage.run(params)
        quantize.run(params, "q8_0")
        reports = {name: evaluate.run(params, name) for name in ("base", "merged", "q8_0")}
        compare.run(params)
        yield project, reports


def test_every_candidate_is_measured_the_same_way(evaluated):
    project, reports = evaluated
    assert reports["base"]["runtime"] == "transformers" and reports["q8_0"]["runtime"] == "llama.cpp"
    assert reports["q8_0"]["format"] == "gguf" and reports["merged"]["format"] == "hf"
    for name, report in reports.items():
        assert json.loads((project / "reports" / "eval" / f"{name}.json").read_text()) == report
        for key in ("task_exact_match", "task_rouge_l", "task_json_valid", "perplexity", "size_bytes", "load_seconds",
                    "tokens_per_second", "ttft_seconds_p50", "peak_memory_bytes"):
            assert report[key] is not None, (name, key)
        assert report["task_examples"] == 4 and report["perplexity"] > 1
        answers = (project / "reports" / "eval" / f"{name}.answers.jsonl").read_text().splitlines()
        assert len(answers) == 4 and {"prompt", "reference", "answer"} <= set(json.loads(answers[0]))
    assert reports["q8_0"]["size_bytes"] < reports["merged"]["size_bytes"] / 3
    runs = {r.info.run_name: r for r in mlflow_runs(project)}
    assert runs["evaluate@q8_0"].data.metrics["perplexity"] == reports["q8_0"]["perplexity"]
    assert runs["evaluate@q8_0"].data.tags["evaluate.format"] == "gguf"


def test_compare_report_puts_candidates_side_by_side(evaluated):
    project, reports = evaluated
    md = (project / "reports" / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | base | merged | q8_0 |"
    assert "held-out perplexity" in md and "%)" in md and "## Answers side by side" in md
    page = (project / "reports" / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "http://" not in page and "https://" not in page
    assert all((project / "reports" / "compare" / f"{g}.png").exists() for g in ("quality", "perplexity", "size", "speed"))
    first = json.loads((project / "reports" / "eval" / "merged.answers.jsonl").read_text().splitlines()[0])
    assert first["prompt"][:40] in page.replace("&quot;", '"')
