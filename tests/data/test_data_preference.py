"""Preference records: every layout normalized to prompt + answers, bad records named by file, record and field."""

from __future__ import annotations

import json

import pytest

from ftq.data.check import check_file
from ftq.data.errors import RecordError
from ftq.data.formats import FormatSpec
from ftq.data.preference import kind, normalize
from ftq.data.registry import RegistryError, load_registry

from conftest import shared_file

SHAREGPT = FormatSpec.build("sharegpt", ranking=True)
KTO = FormatSpec.build("openai", {"kto_tag": "label"})


def pair(prompt="Extract the order.", chosen="right", rejected="wrong"):
    return {"conversations": [{"from": "human", "value": prompt}],
            "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}


def test_a_sharegpt_pair_becomes_one_prompt_and_two_answers():
    record = pair()
    record["conversations"] = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": "Extract the order."}]
    got = normalize(record, SHAREGPT, "f.json", 0)
    assert [m["role"] for m in got["prompt"]] == ["user", "assistant", "user"]
    assert got["chosen"] == {"role": "assistant", "content": "right"}
    assert got["rejected"] == {"role": "assistant", "content": "wrong"}


def test_every_layout_gives_the_same_pair():
    want = normalize(pair(), SHAREGPT, "f", 0)
    alpaca = {"instruction": "Extract the order.", "input": "", "chosen": "right", "rejected": "wrong"}
    trl = {"prompt": [{"role": "user", "content": "Extract the order."}],
           "chosen": [{"role": "assistant", "content": "right"}],
           "rejected": [{"role": "assistant", "content": "wrong"}]}
    openai = {"input": {"messages": [{"role": "user", "content": "Extract the order."}]},
              "preferred_output": [{"role": "assistant", "content": "right"}],
              "non_preferred_output": [{"role": "assistant", "content": "wrong"}]}
    assert normalize(alpaca, FormatSpec.build("alpaca", ranking=True), "f", 0) == want
    assert normalize(trl, FormatSpec.build("openai", {"messages": "prompt"}, ranking=True), "f", 0) == want
    assert normalize(openai, FormatSpec.build("openai_preference"), "f", 0) == want


@pytest.mark.parametrize("record, field, reason", [
    (pair(chosen="same", rejected="same"), "rejected", "identical_pair"),
    (pair(chosen="  "), "chosen.value", "empty_field"),
    ({**pair(), "rejected": None}, "rejected", "missing_field"),
    ({**pair(), "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
     "conversations[1].from", "prompt_ends_with_assistant"),
    ({**pair(), "chosen": {"from": "human", "value": "x"}}, "chosen.from", "not_an_answer"),
    ({**pair(), "chosen": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}, "chosen", "not_one_answer"),
])
def test_a_bad_pair_is_named_by_file_record_and_field(record, field, reason):
    with pytest.raises(RecordError) as caught:
        normalize(record, SHAREGPT, "data/p.json", 7)
    assert (caught.value.file, caught.value.record, caught.value.field, caught.value.reason) == (
        "data/p.json", 7, field, reason)
    assert str(caught.value).startswith(f"data/p.json: record 7: field '{field}'")


def test_kto_takes_the_last_turn_as_the_answer_and_needs_a_boolean_label():
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "label": True}
    got = normalize(record, KTO, "k.json", 0)
    assert got == {"prompt": [{"role": "user", "content": "Q"}], "completion": {"role": "assistant", "content": "A"},
                   "label": True, "tools": None}
    with pytest.raises(RecordError, match="field 'label': expected true or false") as caught:
        normalize({**record, "label": "yes"}, KTO, "k.json", 3)
    assert caught.value.reason == "not_a_boolean"


def test_trl_unpaired_records_keep_prompt_and_completion_apart():
    spec = FormatSpec.build("openai", {"messages": "prompt", "completion": "completion", "kto_tag": "label"})
    record = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}],
              "label": False}
    assert normalize(record, spec, "f", 0)["completion"] == {"role": "assistant", "content": "A"}


def test_the_registry_reads_llama_factorys_keys(tmp_path):
    (tmp_path / "datasets.yaml").write_text(
        "dpo:\n  file: d.json\n  format: sharegpt\n  ranking: true\n"
        "  columns: {messages: conversations, chosen: chosen, rejected: rejected}\n"
        "kto:\n  file: k.json\n  format: sharegpt\n  columns: {messages: messages, kto_tag: label}\n"
        "  tags: {role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}\n"
        "sft:\n  file: s.json\n")
    registry = load_registry(tmp_path / "datasets.yaml")
    assert [kind(registry[n].format) for n in ("dpo", "kto", "sft")] == ["pair", "unpaired", None]
    (tmp_path / "bad.yaml").write_text("dpo:\n  file: d.json\n  ranking: 'yes'\n")
    with pytest.raises(RegistryError, match="dataset 'dpo': field 'ranking': expected true or false"):
        load_registry(tmp_path / "bad.yaml")


def test_llama_factorys_dpo_demo_file_parses_whole():
    path = shared_file("preference", "dpo_zh_demo.json")
    checked = check_file(path, SHAREGPT)
    assert checked.records == len(json.loads(path.read_text())) == 300
    assert not checked.errors, checked.errors[:3]
    assert all(r["prompt"][-1]["role"] == "user" and r["chosen"] != r["rejected"] for r in checked.conversations)


def test_llama_factorys_kto_demo_file_parses_whole():
    path = shared_file("preference", "kto_en_demo.json")
    spec = FormatSpec.build("sharegpt", {"messages": "messages", "kto_tag": "label"},
                            {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"})
    checked = check_file(path, spec)
    assert checked.records == 300 and not checked.errors, checked.errors[:3]
    labels = [r["label"] for r in checked.conversations]
    assert True in labels and False in labels


def test_the_shared_pairs_tokenize_with_one_prompt_for_both_answers(tokenizer):
    from ftq.data.tokenize import tokenize_conversation, tokenize_preference

    records = check_file(shared_file("preference", "dpo_zh_demo.json"), SHAREGPT).conversations[:40]
    for record in records:
        tokens = tokenize_preference(tokenizer, record, max_length=100_000)
        for side in ("chosen", "rejected"):
            whole = tokenize_conversation(tokenizer, {"messages": [*record["prompt"], record[side]], "tools": None},
                                          100_000)
            assert tokens.prompt_ids + tokens.answers[side] == whole.input_ids


def test_the_default_pairs_are_what_the_generator_writes_and_each_rejects_a_measured_mistake(tmp_path):
    from pathlib import Path

    from ftq.data import preference_set

    committed = Path(__file__).resolve().parents[2] / "data" / "raw" / "ftq_default"
    for written in preference_set.write(tmp_path):
        assert written.read_text() == (committed / written.name).read_text(), written.name
    registry = load_registry(committed.parents[1] / "datasets.yaml")
    for name, count in (("ftq_default_pairs", 240), ("ftq_default_pairs_heldout", 60)):
        spec = registry[name]
        checked = check_file(spec.file, spec.format)
        assert checked.records == count and not checked.errors, checked.errors[:3]
    train, heldout = preference_set.generate()
    assert not {p["input"] for p in train} & {p["input"] for p in heldout}
    for pair in train + heldout:
        chosen, rejected = json.loads(pair["chosen"]), json.loads(pair["rejected"])
        wrong = [k for k in chosen if chosen[k] != rejected[k]]
        assert len(wrong) == 1 and wrong[0] != "quantity"  # one mistake, of a kind merged makes
