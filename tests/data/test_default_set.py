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
