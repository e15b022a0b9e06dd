import json

from conftest import REPO
from ftq.data import default_set
from ftq.data.check import check_file
from ftq.data.formats import FormatSpec


def test_committed_default_set_is_what_the_generator_writes(tmp_path):
    default_set.write(tmp_path)
    for name in ("train.json", "heldout.json"):
        assert (tmp_path / name).read_text() == (REPO / "data" / "raw" / "ftq_default" / name).read_text(), name


def test_heldout_shares_no_names_items_or_cities_with_train():
    train, heldout = default_set.generate()
    train_text = json.dumps(train)
    for word in default_set.HELDOUT_NAMES + default_set.HELDOUT_ITEMS + default_set.HELDOUT_CITIES:
        assert word not in train_text, word
    assert not {r["instruction"] for r in heldout if not r["input"]} & {r["instruction"] for r in train}


def test_default_set_is_valid_and_json_answers_parse():
    for name in ("train.json", "heldout.json"):
        check = check_file(REPO / "data" / "raw" / "ftq_default" / name, FormatSpec.build("alpaca"))
        assert not check.errors and not check.duplicates
    train, _ = default_set.generate()
    for record in train:
        if record["input"]:
            assert list(json.loads(record["output"])) == list(default_set.JSON_KEYS)


def test_replay_is_the_base_models_own_answers_to_the_projects_prompts(tiny_model_dir):
    """replay.json holds answers to GENERAL_PROMPTS only, none of them a question evaluate.general asks;
    the generator writes what the model answers (here a tiny model: the mechanism, not the text)."""
    import yaml

    from ftq.data import replay

    committed = json.loads((REPO / "data" / "raw" / "ftq_default" / "replay.json").read_text())
    prompts = [r["instruction"] for r in committed]
    assert prompts == [p for p in replay.GENERAL_PROMPTS if p in prompts] and len(prompts) >= 48
    assert all(r["output"].strip() and not r["input"] for r in committed)
    check = check_file(REPO / "data" / "raw" / "ftq_default" / "replay.json", FormatSpec.build("alpaca"))
    assert not check.errors and not check.duplicates
    asked = [q["prompt"] for q in yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["general"]["questions"]]
    assert asked and not set(asked) & set(replay.GENERAL_PROMPTS)
    rows = replay.answer(tiny_model_dir, replay.GENERAL_PROMPTS[:3], max_new_tokens=4, batch_size=2)
    assert [r["instruction"] for r in rows] == replay.GENERAL_PROMPTS[:3]
    assert all(isinstance(r["finished"], bool) for r in rows)
