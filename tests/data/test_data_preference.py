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


def test_the_default_pairs_are_what_the_generator_writes_and_each_rejects_a_mistake(tmp_path):
    """Held-out pairs: exactly the generator's (synthetic mistakes on held-out words). Training pairs: the
    generator's orders and right answers; each rejected answer is its synthetic mistake or, where the demo's
    SFT model answered the order wrong (`make-default --pairs-from models/merged`), that answer."""
    from pathlib import Path

    from ftq.data import preference_set

    committed = Path(__file__).resolve().parents[2] / "data" / "raw" / "ftq_default"
    written = preference_set.write(tmp_path)
    assert written[1].read_text() == (committed / written[1].name).read_text()
    registry = load_registry(committed.parents[1] / "datasets.yaml")
    for name, count in (("ftq_default_pairs", 240), ("ftq_default_pairs_heldout", 60)):
        spec = registry[name]
        checked = check_file(spec.file, spec.format)
        assert checked.records == count and not checked.errors, checked.errors[:3]
    train, heldout = preference_set.generate()
    on_disk = json.loads((committed / "preference.json").read_text())
    taken = 0
    for synthetic, pair in zip(train, on_disk, strict=True):
        assert {k: pair[k] for k in ("instruction", "input", "chosen")} == \
            {k: synthetic[k] for k in ("instruction", "input", "chosen")}
        assert pair["rejected"] != pair["chosen"]
        taken += pair["rejected"] != synthetic["rejected"]
    assert 0 < taken < len(train)  # the model's own mistakes where it made one, synthetic ones elsewhere
    assert not {p["input"] for p in train} & {p["input"] for p in heldout}
    # the training pairs' words are new to the SFT model (as the held-out ones are) and never held-out words
    from ftq.data import default_set

    sft_text, heldout_text = json.dumps(default_set.generate()), json.dumps(heldout)
    for word in preference_set.PAIR_NAMES + preference_set.PAIR_ITEMS + preference_set.PAIR_CITIES:
        assert word not in sft_text and word not in heldout_text, word
    for word in default_set.HELDOUT_NAMES + default_set.HELDOUT_ITEMS + default_set.HELDOUT_CITIES:
        assert word not in json.dumps(train), word
    for pair in train + heldout:
        chosen, rejected = json.loads(pair["chosen"]), json.loads(pair["rejected"])
        wrong = [k for k in chosen if chosen[k] != rejected[k]]
        assert len(wrong) == 1 and wrong[0] != "quantity"  # one mistake, of a kind merged makes


def test_training_pairs_reject_the_models_own_wrong_answers(tiny_model_dir):
    """with_model_mistakes keeps a right answer's synthetic mistake and takes a wrong answer as rejected;
    model_answers asks the model through the chat template, one answer per pair (the tiny model: the
    mechanism, not the text)."""
    from ftq.data import preference_set

    pairs = preference_set.generate(train_pairs=3, heldout_pairs=1)[0]
    right, wrong = pairs[0]["chosen"], '{"customer": "Otilie"}'
    mixed, taken = preference_set.with_model_mistakes(pairs, [right, f"  {wrong} ", ""])
    assert taken == 1 and mixed[0] == pairs[0] and mixed[1]["rejected"] == wrong and mixed[2] == pairs[2]
    assert preference_set.prompt_of(pairs[0]) == f"{pairs[0]['instruction']}\n{pairs[0]['input']}"
    answers = preference_set.model_answers(tiny_model_dir, pairs)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
