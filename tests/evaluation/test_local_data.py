"""Standard lm-eval tasks over local files: the six-line HellaSwag layout read into lm-eval's own
`hellaswag` task, seeded samples, the benchmark_data manifest, and clear errors on bad files."""

import json

import pytest

from conftest import shared_file
from ftq.evaluation import local_data
from ftq.evaluation.local_data import LocalDataError, LocalTask

ITEMS = [("Baking: A man mixes flour and water in a bowl. he", "1",
          ["drives a car.", "kneads the dough.", "paints the wall.", "sings a song."]),
         ("Running: A woman ties her shoes. she", "2", ["eats soup.", "sleeps.", "starts to jog.", "reads."])]


def six_lines(items) -> str:
    return "".join(f"{ctx}\n{label}\n" + "".join(e + "\n" for e in endings) for ctx, label, endings in items)


def local(path, **kw) -> LocalTask:
    return LocalTask("hellaswag", path, kw.get("format", local_data.HELLASWAG_LAYOUT), None, kw.get("sample", 0),
                     kw.get("seed", 0))


def test_the_six_line_layout_reads_into_the_fields_lm_evals_hellaswag_task_reads(tmp_path):
    path = tmp_path / "hs.txt"
    path.write_text(six_lines(ITEMS))
    items = local_data.read_hellaswag_layout(path)
    assert items[0] == {"ind": 0, "activity_label": "Baking", "ctx_a": "A man mixes flour and water in a bowl. he",
                        "ctx_b": "", "ctx": "A man mixes flour and water in a bowl. he",
                        "endings": ITEMS[0][2], "label": "1"}
    # lm-eval's own process_docs gives the query llama.cpp reads: the line as it is
    from lm_eval.tasks.hellaswag.utils import process_docs
    import datasets

    doc = process_docs(datasets.Dataset.from_list(items))[0]
    assert doc["query"] == ITEMS[0][0] and doc["choices"] == ITEMS[0][2] and doc["gold"] == 1


@pytest.mark.parametrize("text, message", [
    (six_lines(ITEMS)[:-10], r"hs.txt: 11 lines is not a whole number of six-line items \(item 2 at line 7 is cut short\)"),
    (six_lines(ITEMS).replace("\n2\n", "\nfour\n"), r"hs.txt: item 1 \(line 7\): label \(line 8\): expected 0, 1, 2 or 3, got 'four'"),
    (six_lines(ITEMS).replace("sleeps.", " "), r"hs.txt: item 1 \(line 7\): ending 1 \(line 10\): empty"),
    (six_lines(ITEMS).replace("Running: ", "Running "), r"hs.txt: item 1 \(line 7\): context: expected 'activity label: context'"),
])
def test_a_malformed_file_names_the_file_item_line_and_field(tmp_path, text, message):
    path = tmp_path / "hs.txt"
    path.write_text(text)
    with pytest.raises(LocalDataError, match=message):
        local_data.read_hellaswag_layout(path)


def test_other_formats_go_through_datasets_packaged_builders(tmp_path):
    rows = [{"q": "a", "gold": 0}, {"q": "b", "gold": 1}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert local_data.read_records(LocalTask("t", tmp_path / "d.jsonl", "auto", None, 0, 0)) == rows
    (tmp_path / "d.csv").write_text("q,gold\na,0\nb,1\n")
    assert local_data.read_records(LocalTask("t", tmp_path / "d.csv", "auto", None, 0, 0)) == rows
    (tmp_path / "d.xyz").write_text("x")
    with pytest.raises(LocalDataError, match=r"d.xyz: evaluate.lm_eval.local_data.t.format: cannot tell the format"):
        local_data.read_records(LocalTask("t", tmp_path / "d.xyz", "auto", None, 0, 0))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LocalDataError, match=r"bad.json: not readable as json"):
        local_data.read_records(LocalTask("t", tmp_path / "bad.json", "auto", None, 0, 0))


def test_samples_are_seeded_the_same_every_time_and_in_file_order():
    first = local_data.sample_indices(10042, 300, 0)
    assert first == local_data.sample_indices(10042, 300, 0) == sorted(first) and len(set(first)) == 300
    assert first != local_data.sample_indices(10042, 300, 1)
    assert local_data.sample_indices(5, 0, 0) == local_data.sample_indices(5, 9, 0) == [0, 1, 2, 3, 4]


def test_the_manifest_records_a_present_file_and_says_how_to_get_an_absent_one(tmp_path):
    path = tmp_path / "hs.txt"
    path.write_text(six_lines(ITEMS))
    entry = local_data.manifest_entry(local(path, sample=1))
    assert entry["present"] and entry["items"] == 2 and len(entry["indices"]) == 1 and len(entry["sha256"]) == 64
    absent = local_data.manifest_entry(local(tmp_path / "nowhere.txt"))
    assert not absent["present"] and "nowhere.txt is absent" in absent["note"]
    assert "klosax/hellaswag_text_data" in absent["note"] and "evaluate.lm_eval.local_data.hellaswag.path" in absent["note"]


def test_lm_evals_own_hellaswag_task_reads_the_official_validation_file():
    """The shared file (the official validation set): every item read, and lm-eval's task built over it."""
    from ftq.evaluation import harness

    path = shared_file("hellaswag", "hellaswag_val_full.txt")
    task = local(path, sample=300)
    items = local_data.read_records(task)
    assert len(items) == 10042 and {i["label"] for i in items} == {"0", "1", "2", "3"}
    harness.go_offline()
    config = local_data.task_config(harness.catalogue_manager("hellaswag"), task)
    assert config["task"] == "hellaswag" and config["validation_split"] == "validation"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    assert len(config["custom_dataset"]()["validation"]) == 10042
