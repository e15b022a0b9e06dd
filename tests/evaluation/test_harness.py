"""lm-eval through ftq: the project's own tasks over local files, user task folders, offline standard
tasks (lm-eval's own `hellaswag` over a local file), and GGUF scored in process through llama.cpp exactly
as transformers scores the same weights."""

import json

import pytest

from ftq.evaluation import harness
from ftq.params import ParamsError
from test_local_data import ITEMS, six_lines

QUESTIONS = [("Who are you?", "I am Wren."), ("Name a colour.", "Blue."), ("What is 2+2?", "4"),
             ("Say hi.", "Hi!"), ("Name a fruit.", "An apple.")]


@pytest.fixture
def root(tmp_path):
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    rows.append({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})  # multi-turn
    (processed / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_project_tasks_build_their_documents_from_local_files(root):
    from ftq.evaluation.lm_eval_tasks import utils

    pairs = utils.single_turn({"ftq_root": str(root)})
    assert len(pairs) == 5  # the multi-turn conversation is left out
    text = utils.text_documents()["test"]
    assert len(text) == 10 and text[0]["text"].startswith("A river begins as rain.")
    planned = harness.plan(harness.settings({"tasks": ["ftq"], "local_data": {}}, "params.yaml"), root, "params.yaml")
    assert planned.own == ["ftq"] and planned.others == [] and planned.local == []


def test_unknown_and_not_local_tasks_are_clear_errors(root):
    with pytest.raises(harness.LmEvalError, match=r"evaluate.lm_eval.tasks: unknown lm-eval task\(s\) \['no_such_task'\]"):
        harness.plan(harness.settings({"tasks": ["no_such_task"], "local_data": {}}, "params.yaml"), root, "params.yaml")
    # a real standard task whose dataset is not in the local cache: ftq is offline, so it says so
    with pytest.raises(harness.LmEvalError, match="task 'arc_easy' cannot load its data offline"):
        harness.plan(harness.settings({"tasks": ["arc_easy"], "local_data": {}}, "params.yaml"), root, "params.yaml")
    with pytest.raises(ParamsError, match=r"params.yaml: evaluate.lm_eval.taks: unknown key \(did you mean tasks\?\)"):
        harness.settings({"taks": ["ftq"]}, "params.yaml")


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tiny_model_dir):
    from ftq.quantize import gguf

    out = tmp_path_factory.mktemp("f32-gguf")
    gguf.build(tiny_model_dir, out, gguf.validate({"type": "f32"}, "test"))
    return out / "model.gguf"


def test_gguf_in_process_scores_like_transformers(root, tiny_model_dir, f32_gguf, tmp_path):
    """The same weights (f32 GGUF vs. the HF folder): lm-eval's loglikelihoods through ftq's in-process
    llama.cpp model match lm-eval's `hf` model, document by document, on ftq's tasks, a user's task
    folder and lm-eval's own `hellaswag` over a local file (its seeded sample)."""
    from ftq.evaluation import local_data
    from ftq.runtimes import open_model
    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    (tmp_path / "capitals.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [
        {"q": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0},
        {"q": "The capital of Italy is", "choices": [" Paris", " Rome"], "gold": 1}]))
    (tasks_dir / "capitals.yaml").write_text(
        "task: my_capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'capitals.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n")
    hellaswag = tmp_path / "hs.txt"
    hellaswag.write_text(six_lines(ITEMS * 3))
    local = {"path": str(hellaswag), "format": "llama.cpp-hellaswag", "sample": 4, "seed": 0}
    cfg = harness.settings({"tasks": ["ftq", "my_capitals"], "include_path": [str(tasks_dir)], "limit": 3,
                            "max_gen_toks": 6, "batch_size": 4, "max_length": 512, "dtype": "float32",
                            "local_data": {"hellaswag": local}}, "params.yaml")  # the same float32 weights
    manifest = {"hellaswag": local_data.manifest_entry(local_data.LocalTask.from_settings("hellaswag", cfg["local_data"]["hellaswag"], root))}
    planned = harness.plan(cfg, root, "params.yaml", manifest)
    assert planned.own == ["ftq"] and planned.others == ["my_capitals"] and [t.task for t, _ in planned.local] == ["hellaswag"]
    scores, samples = {}, {}
    for name, path in (("hf", tiny_model_dir), ("gguf", f32_gguf)):
        runtime = open_model(path, threads=1)
        scores[name] = harness.run(runtime, name, planned, tmp_path / "out")
        runtime.close()
        samples[name] = [json.loads(line) for line in (tmp_path / "out" / f"{name}.samples.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "out" / "gguf.json").read_text())["model"] == "ftq llama.cpp (in process)"
    for key, value in scores["hf"].items():
        if key not in ("lm_eval_seconds", "lm_eval_dtype"):
            assert scores["gguf"][key] == pytest.approx(value, rel=1e-3), key
    assert "lm_eval_my_capitals_acc" in scores["gguf"] and "lm_eval_hellaswag_acc_norm" in scores["gguf"]
    for hf_row, gguf_row in zip(samples["hf"], samples["gguf"]):
        assert (hf_row["task"], hf_row["doc_id"]) == (gguf_row["task"], gguf_row["doc_id"])
        if hf_row["task"] == "ftq_heldout_generate":
            assert hf_row["response"] == gguf_row["response"]  # greedy: the same words
    hs = [r for r in samples["gguf"] if r["task"] == "hellaswag"]
    assert sorted(r["doc_id"] for r in hs) == manifest["hellaswag"]["indices"]


def test_endings_that_share_a_context_are_scored_after_one_evaluation_of_it(f32_gguf):
    """The context once, then each ending from its KV cache: the same log-likelihoods as scoring every
    context + ending from scratch, for one context evaluation instead of four."""
    from ftq.evaluation.llamacpp_lm import LlamaCppLM
    from ftq.runtimes import open_model

    runtime = open_model(f32_gguf, threads=1)
    try:
        lm = LlamaCppLM(runtime, max_length=512, max_gen_toks=8)
        context = lm.tok_encode("Baking: A man mixes flour and water in a bowl. he")
        endings = [lm.tok_encode(" " + e) for e in ITEMS[0][2]]
        requests = [(None, context, e) for e in endings] + [(None, context[:5], endings[0])]
        tokens = []
        from ftq.evaluation import llamacpp_lm

        score = llamacpp_lm.SharedPrefixBatch.score
        llamacpp_lm.SharedPrefixBatch.score = lambda self, items: (
            tokens.append(sum(self.tokens(c, cs) for c, cs in items)), score(self, items))[1]
        try:
            shared = lm._loglikelihood_tokens(requests)
        finally:
            llamacpp_lm.SharedPrefixBatch.score = score
            lm.close()
        # both items in one decode: each context once, each ending's tokens once
        assert tokens == [len(context) + 5 + sum(len(e) - 1 for e in endings) + len(endings[0]) - 1]
        for (_, ctx, ending), (logprob, _) in zip(requests, shared):
            nll, _ = runtime.sequence_nll(ctx + ending, [False] * len(ctx) + [True] * len(ending))
            assert logprob == pytest.approx(-nll, rel=1e-4, abs=1e-3)
    finally:
        runtime.close()


@pytest.mark.parametrize("row_tokens", [1, 384])
def test_hf_endings_scored_from_the_shared_context_match_lm_evals_own_hf_model(tiny_model_dir, row_tokens):
    """Each context once and its endings after it, several items packed in one row under a mask that
    keeps endings and items apart (row_tokens 384), or one item per row (1): the same log-likelihoods
    and greedy flags as lm-eval's HFLM scoring each pair from scratch."""
    from lm_eval.models.huggingface import HFLM

    from ftq.evaluation.transformers_lm import SharedContextHFLM
    from ftq.runtimes import open_model

    runtime = open_model(tiny_model_dir, threads=1)
    kwargs = dict(pretrained=runtime.model, tokenizer=runtime.tokenizer, batch_size=4, max_length=512, device="cpu")
    shared, plain = SharedContextHFLM(**kwargs), HFLM(**kwargs)
    shared.row_tokens = row_tokens
    context = shared.tok_encode("Baking: A man mixes flour and water in a bowl. he")
    other = shared.tok_encode("Sailing: The boat leaves the harbour and the crew")
    endings = [shared.tok_encode(" " + e) for e in ITEMS[0][2]] + [shared.tok_encode(" x")]
    requests = ([(("c", "e"), context, e) for e in endings] + [(("c2", "e"), context[:6], endings[1])]
                + [(("c3", "e"), other, e) for e in endings[:3]])
    for (mine, my_greedy), (theirs, their_greedy) in zip(shared._loglikelihood_tokens(requests),
                                                          plain._loglikelihood_tokens(requests), strict=True):
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-4) and my_greedy == their_greedy


def test_no_tasks_still_writes_the_outputs_dvc_declares(tmp_path):
    """`evaluate.lm_eval.tasks: []` (e.g. a tools-only data set, which lm-eval cannot show) must not fail
    `dvc repro` on missing outputs: the results file says no tasks ran and the samples file is empty."""
    from ftq.evaluation import harness

    planned = harness.Plan({"tasks": []}, None, [], [])
    planned.skipped = {"hellaswag": "skipped: /x/hs.txt is absent"}
    assert harness.run(None, "merged", planned, tmp_path) == {}
    written = json.loads((tmp_path / "merged.json").read_text())
    assert written["results"] == {} and written["skipped"] == {"hellaswag": "skipped: /x/hs.txt is absent"}
    assert (tmp_path / "merged.samples.jsonl").read_text() == ""
