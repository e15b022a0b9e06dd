import json
import shutil

import pytest
import yaml
from datasets import load_from_disk
from transformers import AutoTokenizer

from conftest import FIXTURES, load_params, mlflow_runs, set_params, shared_file
from ftq.data.errors import DataError
from ftq.data.registry import RegistryError
from ftq.stages import base, prepare


@pytest.fixture()
def based(project):
    base.run(load_params(project))
    return project


def register(root, name, file, **entry):
    registry = root / "data" / "datasets.yaml"
    data = yaml.safe_load(registry.read_text())
    data[name] = {"file": str(file), **entry}
    registry.write_text(yaml.safe_dump(data))


def test_prepare_default_data(based):
    result = prepare.run(load_params(based))
    out = based / "data" / "processed"
    report = json.loads((based / "reports" / "data.json").read_text())
    replay = len(json.loads((based / "data" / "raw" / "ftq_default" / "replay.json").read_text()))
    assert report["records_in"] == 388 + replay and report["rejected"] == 0
    assert report["train"]["examples"] == 300 + replay and report["eval"]["examples"] == 88
    assert report["datasets"]["ftq_default_heldout"]["eval"] == 88
    assert report["datasets"]["ftq_default_replay"]["train"] == replay
    assert report["train"]["length"]["p50"] > 0 and result.report == report
    train = load_from_disk(str(out / "train"))
    assert len(train) == 300 + replay and set(train.column_names) == {"input_ids", "labels", "length"}
    assert all(any(label != -100 for label in row) for row in train["labels"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train_examples"] == 300 + replay and len(manifest["md5"]) == 32
    assert (based / "reports" / "data_lengths.png").read_bytes()[:4] == b"\x89PNG"
    runs = {r.data.tags["ftq.stage"]: r for r in mlflow_runs(based)}
    run = runs["prepare"]
    assert run.data.params["data.max_length"] == "512" and run.data.metrics["train_examples"] == 300 + replay
    assert run.data.tags["data.md5"] == manifest["md5"]


def test_split_and_sampling_are_seeded(based):
    set_params(based, data={"eval_size": 0.2, "datasets": ["ftq_default"]})
    prepare.run(load_params(based))
    first = (based / "data" / "processed" / "eval.jsonl").read_text()
    assert len(first.splitlines()) == 60
    assert (based / "data" / "processed" / "eval").is_dir()
    prepare.run(load_params(based))
    assert (based / "data" / "processed" / "eval.jsonl").read_text() == first
    set_params(based, data={"seed": 7})
    prepare.run(load_params(based))
    assert (based / "data" / "processed" / "eval.jsonl").read_text() != first


def test_num_samples_subsamples_and_repeats(based):
    register(based, "small", (based / "data/raw/ftq_default/heldout.json"), num_samples=10)
    register(based, "big", (based / "data/raw/ftq_default/heldout.json").resolve(), num_samples=100)
    set_params(based, data={"datasets": ["small"], "eval_size": 0})
    assert prepare.run(load_params(based)).report["train"]["examples"] == 10
    assert not (based / "data" / "processed" / "eval").exists()  # no eval split: no empty dataset folder
    set_params(based, data={"datasets": ["big"]})
    # duplicates of the same file were already dropped: repeats are deliberate sampling, not duplicates
    assert prepare.run(load_params(based)).report["train"]["examples"] == 100


def test_on_error_fail_names_every_bad_record_and_keeps_previous_output(based):
    prepare.run(load_params(based))
    before = (based / "data" / "processed" / "train.jsonl").read_text()
    bad = FIXTURES / "data" / "alpaca_bad.json"
    register(based, "bad", bad)
    set_params(based, data={"datasets": ["ftq_default", "bad"]})
    with pytest.raises(DataError) as caught:
        prepare.run(load_params(based))
    message = str(caught.value)
    assert "4 invalid record(s)" in message
    assert f"{bad}: record 2: field 'output': expected a string, got int" in message
    assert (based / "data" / "processed" / "train.jsonl").read_text() == before
    assert not list((based / "data").glob("processed.tmp-*"))


def test_on_error_skip_writes_rejects_with_reasons(based):
    bad = FIXTURES / "data" / "sharegpt_bad.jsonl"
    register(based, "bad", bad, format="sharegpt")
    set_params(based, data={"datasets": ["ftq_default", "bad"], "on_error": "skip"})
    report = prepare.run(load_params(based)).report
    assert report["rejected"] == 8
    assert report["rejects_by_reason"]["turn_order"] == 3
    assert report["datasets"]["bad"]["valid"] == 2
    rejects = [json.loads(line) for line in (based / "reports" / "data_rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 8 and rejects[0]["reason"] == "invalid_json" and rejects[0]["line"] == 2
    assert {"file", "record", "field", "reason", "message"} <= set(rejects[1])


def test_openai_file_with_tools_tokenizes(based):
    register(based, "tools", FIXTURES / "data" / "openai_ok.jsonl", format="openai", split="train")
    set_params(based, data={"datasets": ["tools"], "eval_size": 0})
    report = prepare.run(load_params(based)).report
    assert report["train"]["examples"] == 2 and report["train"]["with_tools"] == 1


def test_the_tool_call_set_keeps_its_tools_in_every_tokenized_example(based):
    """The project's tool set is in LLaMA-Factory's ShareGPT layout (tools as JSON text, function_call and
    observation turns): SmolLM2's template ignores tools, so every example goes through ftq's fallback."""
    from ftq.data import tool_set

    set_params(based, data={"datasets": ["ftq_tools", "ftq_tools_heldout"], "max_length": 1024})
    prepare.run(load_params(based))
    report = json.loads((based / "reports" / "data.json").read_text())
    assert report["tool_rendering"] == "ftq_fallback" and report["rejected"] == 0
    assert report["train"]["with_tools"] == report["train"]["examples"] > 100
    assert report["eval"]["with_tools"] == report["eval"]["examples"] > 20
    tokenizer = AutoTokenizer.from_pretrained(based / "models" / "base")
    descriptions = [t["description"] for t in tool_set.TOOLS]
    for part in ("train", "eval"):
        rows = load_from_disk(str(based / "data" / "processed" / part))
        for number, ids in enumerate(rows["input_ids"]):
            shown = tokenizer.decode(ids)
            assert all(d in shown for d in descriptions), (part, number)
    manifest = json.loads((based / "data" / "processed" / "manifest.json").read_text())
    run = {r.data.tags["ftq.stage"]: r for r in mlflow_runs(based)}["prepare"]
    assert manifest["tool_rendering"] == run.data.tags["data.tool_rendering"] == "ftq_fallback"


def test_unknown_dataset_and_bad_params(based):
    set_params(based, data={"datasets": ["nope"]})
    with pytest.raises(RegistryError, match="no dataset named 'nope'"):
        prepare.run(load_params(based))
    set_params(based, data={"datasets": ["ftq_default"], "on_error": "ignore"})
    with pytest.raises(Exception, match=r"data.on_error: expected one of fail, skip, got 'ignore'"):
        prepare.run(load_params(based))


def test_a_preference_dataset_is_not_taken_as_sft_data(based):
    register(based, "pairs", shared_file("preference", "dpo_zh_demo.json"), format="sharegpt", ranking=True)
    set_params(based, data={"datasets": ["ftq_default", "pairs"]})
    with pytest.raises(Exception, match="dataset 'pairs' holds preference records"):
        prepare.run(load_params(based))


def test_too_long_examples_are_truncated_or_dropped(based):
    set_params(based, data={"max_length": 80})
    report = prepare.run(load_params(based)).report
    assert report["train"]["truncated"] > 0 and report["train"]["length"]["max"] == 80
    set_params(based, data={"truncation": "drop"})
    report = prepare.run(load_params(based)).report
    assert report["train"]["dropped_too_long"] > 0 and report["train"]["length"]["max"] <= 80


def test_shared_alpaca_sets_prepare(based):
    demo, identity = shared_file("sft", "alpaca_en_demo.json"), shared_file("sft", "identity.json")
    register(based, "alpaca_en_demo", demo)
    register(based, "identity", identity)
    set_params(based, data={"datasets": ["alpaca_en_demo", "identity"], "eval_size": 0.1, "max_length": 1024})
    report = prepare.run(load_params(based)).report
    assert report["records_in"] == 1090 and report["duplicates"] == 14 and report["rejected"] == 0
    assert report["train"]["examples"] + report["eval"]["examples"] + report["eval"]["dropped_too_long"] + report["train"]["dropped_too_long"] == 1076
    assert 100 <= report["eval"]["examples"] <= 110
