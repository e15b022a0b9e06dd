import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURES, shared_file
from ftq.data.check import check_file
from ftq.data.errors import DataError
from ftq.data.formats import FormatSpec
from ftq.data.readers import read_records

DATA = FIXTURES / "data"


def ftq(*args):
    return subprocess.run([sys.executable, "-m", "ftq", *args], capture_output=True, text=True, timeout=300)


def test_record_17_without_output_is_named():
    result = ftq("data", "check", str(DATA / "alpaca_record17_no_output.json"))
    assert result.returncode == 1
    assert f"{DATA / 'alpaca_record17_no_output.json'}: record 17: field 'output': missing" in result.stdout
    assert "20 records, 19 valid, 1 rejected (missing_field: 1)" in result.stdout


def test_alpaca_errors_exact():
    result = ftq("data", "check", str(DATA / "alpaca_bad.json"))
    name = DATA / "alpaca_bad.json"
    assert result.returncode == 1
    assert result.stdout.splitlines()[:4] == [
        f"{name}: record 1: field 'instruction': empty",
        f"{name}: record 2: field 'output': expected a string, got int",
        f"{name}: record 3: expected an object, got list",
        f"{name}: record 4: field 'history[0]': expected a [prompt, response] pair",
    ]
    assert "7 records, 2 valid, 4 rejected" in result.stdout
    assert "duplicates dropped: 1" in result.stdout


def test_sharegpt_errors_exact():
    name = DATA / "sharegpt_bad.jsonl"
    result = ftq("data", "check", str(name), "--format", "sharegpt")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[:8] == [
        f"{name}: record 1 (line 2): invalid JSON: Expecting ',' delimiter",
        f"{name}: record 2: field 'conversations[1].from': unknown role 'bot' "
        "(known: 'human', 'gpt', 'observation', 'function_call', 'system')",
        f"{name}: record 3: field 'conversations[0].from': turn out of order: expected a user or observation turn, got 'gpt'",
        f"{name}: record 4: field 'conversations': empty conversation",
        f"{name}: record 5: field 'conversations': the last turn must be the assistant's",
        f"{name}: record 6: field 'conversations[0].value': expected a string, got list",
        f"{name}: record 7: field 'conversations[1].from': a system turn is only allowed first",
        f"{name}: record 9: field 'conversations': missing",
    ]
    assert "10 records, 2 valid, 8 rejected" in lines[-1]


def test_broken_json_file_names_line_and_column():
    result = ftq("data", "check", str(DATA / "broken.json"))
    assert result.returncode == 2
    assert f"error: {DATA / 'broken.json'}: invalid JSON at line 4 column 1: Expecting value" in result.stderr


def test_valid_openai_file_passes():
    result = ftq("data", "check", str(DATA / "openai_ok.jsonl"), "--format", "openai")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 records, 2 valid, 0 rejected" in result.stdout


def test_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('instruction,input,output,history\nHi,,Hello,"[[""a"", ""b""]]"\nBye,,,\n')
    check = check_file(csv_path, FormatSpec.build("alpaca"))
    assert len(check.conversations) == 1 and len(check.conversations[0]["messages"]) == 4
    assert [str(e) for e in check.errors] == [f"{csv_path}: record 1: field 'output': empty"]

    parquet_path = tmp_path / "d.parquet"
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    check = check_file(parquet_path, FormatSpec.build("sharegpt"))
    assert len(check.conversations) == 1 and not check.errors


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        list(read_records(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="no such file"):
        list(read_records(tmp_path / "x.json"))
    (tmp_path / "obj.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="expected a JSON array of records, got dict"):
        list(read_records(tmp_path / "obj.json"))


@pytest.mark.parametrize("name, records, duplicates", [("alpaca_en_demo.json", 999, 14), ("identity.json", 91, 0)])
def test_shared_alpaca_sets_check_clean(name, records, duplicates):
    path = shared_file("sft", name)
    result = ftq("data", "check", str(path))
    assert result.returncode == 0, result.stdout
    assert f"{records} records, {records - duplicates} valid, 0 rejected" in result.stdout
    assert f"duplicates dropped: {duplicates}" in result.stdout
