import json
import re

import pytest

from conftest import mlflow_runs
from ftq.layout import eval_dir as report_dir

def test_every_candidate_is_measured_the_same_way(evaluated):
    project, reports = evaluated
    assert reports["base"]["runtime"] == "transformers" and reports["q8_0"]["runtime"] == "llama.cpp"
    assert reports["q8_0"]["format"] == "gguf" and reports["merged"]["format"] == "hf"
    # evaluate.lm_eval.dtype auto: the float32 HF candidates are scored in bf16 where this machine multiplies
    # it natively; a GGUF computes as llama.cpp does for its types
    from ftq.hf import compute_dtype

    assert reports["base"]["lm_eval_dtype"] == reports["merged"]["lm_eval_dtype"] == compute_dtype("auto", "float32")
    assert reports["q8_0"]["lm_eval_dtype"] is None
    for name, report in reports.items():
        assert json.loads((project / report_dir(name) / f"{name}.json").read_text()) == report
        for key in ("task_exact_match", "task_rouge_l", "task_json_valid", "perplexity", "size_bytes", "load_seconds",
                    "tokens_per_second", "ttft_seconds_p50", "peak_memory_bytes"):
            assert report[key] is not None, (name, key)
        assert report["task_examples"] == 4 and report["perplexity"] > 1
        answers = (project / report_dir(name) / f"{name}.answers.jsonl").read_text().splitlines()
        assert len(answers) == 4 and {"prompt", "reference", "answer"} <= set(json.loads(answers[0]))
    assert reports["q8_0"]["size_bytes"] < reports["merged"]["size_bytes"] / 3
    # speed: three repeats, each beside merged measured in the same run; merged is its own reference
    for name, report in reports.items():
        assert report["speed_repeats"] == 3 and len(report["tokens_per_second_runs"]) == 3, name
        assert len(report["relative_tokens_per_second_runs"]) == 3 and report["reference_tokens_per_second"] > 0
        runs = report["tokens_per_second_runs"]
        assert report["tokens_per_second"] == sorted(runs)[1]
        assert report["tokens_per_second_spread"] == pytest.approx((max(runs) - min(runs)) / sorted(runs)[1], abs=1e-3)
    assert reports["merged"]["relative_tokens_per_second"] == 1.0
    assert reports["q8_0"]["relative_tokens_per_second"] != 1.0
    # general questions from params.yaml, answered by every candidate
    for name, report in reports.items():
        general = [json.loads(line) for line in
                   (project / report_dir(name) / f"{name}.general.jsonl").read_text().splitlines()]
        assert len(general) == report["general_questions"] == 8
        assert report["general_accuracy"] == pytest.approx(sum(g["correct"] for g in general) / 8, abs=1e-4)
        assert all(g["answer"] is not None and g["expect"] for g in general)
    runs = {r.info.run_name: r for r in mlflow_runs(project)}
    assert runs["evaluate@q8_0"].data.metrics["perplexity"] == reports["q8_0"]["perplexity"]
    assert runs["evaluate@q8_0"].data.tags["evaluate.format"] == "gguf"


def test_lm_eval_runs_ftqs_tasks_for_every_candidate(evaluated):
    project, reports = evaluated
    for name, report in reports.items():
        for key in ("lm_eval_ftq_heldout_generate_exact_match",
                    "lm_eval_ftq_heldout_generate_chrf", "lm_eval_ftq_text_perplexity_word_perplexity",
                    "lm_eval_ftq_text_perplexity_bits_per_byte"):
            assert isinstance(report[key], float), (name, key)
        results = json.loads((project / report_dir(name) / "lm_eval" / f"{name}.json").read_text())
        assert results["n_samples"]["ftq_heldout_generate"]["effective"] == 3
        assert results["model"] == ("hf" if report["runtime"] == "transformers" else "ftq llama.cpp (in process)")
        samples = [json.loads(line) for line in
                   (project / report_dir(name) / "lm_eval" / f"{name}.samples.jsonl").read_text().splitlines()]
        assert {s["task"] for s in samples} - {"hellaswag"} == {"ftq_heldout_generate", "ftq_text_perplexity"}
    # q8_0 is nearly lossless: the same text scores nearly the same through llama.cpp's server as in transformers
    merged, q8 = (reports[n]["lm_eval_ftq_text_perplexity_word_perplexity"] for n in ("merged", "q8_0"))
    assert abs(q8 - merged) / merged < 0.05
    md = (project / "reports" / "compare.md").read_text()
    assert "lm-eval ftq_heldout_generate_chrf" in md and (project / "reports" / "compare" / "lm_eval.png").exists()


def test_hellaswag_is_scored_for_every_candidate_on_the_same_items_paired_with_merged(evaluated):
    """lm-eval's own hellaswag task over the official validation file: the same seeded items for every
    candidate, each metric with its interval and, but for merged, the paired difference vs merged."""
    from conftest import shared_file

    shared_file("hellaswag", "hellaswag_val_full.txt")
    project, reports = evaluated
    manifest = json.loads((project / "data" / "benchmarks.json").read_text())["hellaswag"]
    assert manifest["present"] and manifest["items"] == 10042 and len(manifest["indices"]) == 8
    for name, report in reports.items():
        section = report["benchmarks"]["hellaswag"]
        assert section["status"] == "ok" and section["items"] == 8 and section["sha256"] == manifest["sha256"]
        acc_norm = section["metrics"]["acc_norm"]
        assert acc_norm["mean"] == pytest.approx(report["lm_eval_hellaswag_acc_norm"], abs=1e-4)
        assert acc_norm["interval"][0] <= acc_norm["mean"] <= acc_norm["interval"][1]
        samples = [json.loads(line) for line in
                   (project / report_dir(name) / "lm_eval" / f"{name}.samples.jsonl").read_text().splitlines()]
        assert sorted(s["doc_id"] for s in samples if s["task"] == "hellaswag") == manifest["indices"]
        assert ("vs_merged" in acc_norm) == (name != "merged")
        if name != "merged":
            assert report["lm_eval_hellaswag_acc_norm_vs_merged"] == acc_norm["vs_merged"]["diff"]
            assert acc_norm["vs_merged"]["examples"] == 8
    md = (project / "reports" / "compare.md").read_text()
    assert "## Standard benchmarks" in md and "| hellaswag acc_norm | q8_0 |" in md


def test_an_absent_benchmark_file_is_skipped_saying_how_to_get_it(project, monkeypatch):
    """A user without the file: data/benchmarks.json notes it, evaluation and the guard skip it."""
    from conftest import load_params
    from ftq.stages import benchmark_data

    entries = benchmark_data.run(load_params(project))  # params.yaml's ../shared/data path, absent beside a temp project
    assert not entries["hellaswag"]["present"]
    assert "klosax/hellaswag_text_data" in entries["hellaswag"]["note"]


def test_compare_report_puts_candidates_side_by_side(evaluated):
    project, reports = evaluated
    md = (project / "reports" / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | base | merged | q4_0 | q8_0 |"
    assert "held-out perplexity" in md and "%)" in md and "## Answers side by side" in md
    speed = next(line for line in md.splitlines() if line.startswith("| speed vs merged (x)"))
    assert speed.split("|")[3].strip().startswith("1") and "(spread" in md  # merged is the reference
    assert next(line for line in md.splitlines() if line.startswith("| general questions"))
    page = (project / "reports" / "compare.html").read_text()
    # self-contained: nothing fetched from the network (a URL in a note's text, e.g. where to download
    # HellaSwag when its file is absent, fetches nothing)
    assert page.count("data:image/png;base64,") == 6  # five metric groups and the ladder's size-vs-quality plot
    ladder = md[md.index("## Quantization ladder"):]
    rows = [line for line in ladder.splitlines() if line.startswith("| q")]
    assert [r.split("|")[1].strip() for r in rows] == ["q4_0", "q8_0"]  # smallest first
    # select best (the fixture's): every screened build evaluated in full, no walk
    assert all(r.split("|")[8].strip() == "passed" and r.split("|")[12].strip().endswith("(evaluated in full)")
               for r in rows)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""", page)
    assert all((project / "reports" / "compare" / f"{g}.png").exists()
               for g in ("quality", "lm_eval", "perplexity", "size", "speed"))
    first = json.loads((project / "reports" / "eval" / "merged.answers.jsonl").read_text().splitlines()[0])
    assert first["prompt"][:40] in page.replace("&quot;", '"')



def test_teacher_forced_scores_pair_every_candidate_with_merged_on_the_same_tokens(evaluated):
    """merged's evaluation stores its distribution on the held-out answers; every build (llama.cpp) is
    scored on those token ids: merged is 0 from itself, the 4-bit build further than the 8-bit one."""
    from ftq import layout
    from ftq.quantize import distance

    project, reports = evaluated
    stored = distance.load(project / layout.HELDOUT_REFERENCE)
    rows = {name: [json.loads(line) for line in
                   (project / report_dir(name) / f"{name}.forced.jsonl").read_text().splitlines()]
            for name in reports}
    # base is not made from merged: not scored (no decision reads it)
    assert rows.pop("base") == [] and "forced_kld" not in reports["base"]
    answers = [json.loads(line)["id"] for line in (project / report_dir("merged") / "merged.answers.jsonl").open()]
    # evaluate.forced_examples 0: every held-out conversation, apart from the 4 answered ones
    examples = len(stored.meta["example_ids"])
    assert examples > 4 and set(answers) < set(stored.meta["example_ids"])
    for name, scored in rows.items():
        assert [r["id"] for r in scored] == stored.meta["example_ids"], name
        assert [r["tokens"] for r in scored] == [r["tokens"] for r in rows["merged"]], name
        assert reports[name]["forced_kld_examples"] == examples and len(reports[name]["forced_logprob_ci95"]) == 2
    assert all(r["kld"] == 0 for r in rows["merged"])
    mean = {name: sum(r["kld"] for r in scored) / examples for name, scored in rows.items()}
    assert 0 < mean["q8_0"] < mean["q4_0"]


def test_the_ladder_walks_on_a_teacher_forced_metric(evaluated_copy, monkeypatch):
    """promote.policy.metric forced_kld: each build's first look is its teacher-forced rows (no answers),
    tested against merged's zeros; the pick's full evaluation keeps the very rows the walk decided on
    (scored once per build: the walk's look, never again)."""
    from conftest import load_params, set_params
    from ftq import layout
    from ftq.evaluation import forced
    from ftq.stages import ladder

    scored = []
    original = forced.rows
    monkeypatch.setattr(forced, "rows", lambda runtime, merged: scored.append(runtime.kind) or original(runtime, merged))

    project = evaluated_copy
    params = load_params(project)
    set_params(project, promote={**params["promote"], "policy": {
        **params["promote"]["policy"], "metric": "forced_kld", "direction": "min", "margin": 0.5,
        "select": "smallest_faithful"}})
    report = ladder.run(load_params(project))
    assert report["metric"] == "forced_kld" and report["walk"]["order"] == ["q8_0", "q4_0"]
    tests = {r["name"]: r["test"] for r in report["rungs"]}
    for name in ("q8_0", "q4_0"):
        test = tests[name]["metric_test"]
        assert test["metric"] == "forced_kld" and test["outcome"] == "faithful" and test["examples"] > 4
        assert test["test"].startswith("BCa bootstrap") and test["diff"] < 0  # merged - build: a loss
    pick = report["walk"]["pick"]
    quick = (project / layout.BUILDS_ROOT / f"{pick}.quick.jsonl").read_text()
    assert quick == (project / layout.BUILDS_ROOT / f"{pick}.forced.jsonl").read_text()
    assert scored == ["llama.cpp", "llama.cpp"]  # q8_0's and q4_0's looks; the pick's evaluation reused its rows
