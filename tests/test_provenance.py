"""ftq.provenance: every report records the commit, script, sources, versions and machine that made it."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import REPO

from ftq import provenance


def test_a_record_names_the_commit_script_sources_versions_and_machine(monkeypatch):
    monkeypatch.chdir(REPO)  # repo_root() is found from the working directory, as a stage's is
    started = time.perf_counter()
    record = provenance.record(REPO / "bench" / "quantize.py")
    assert time.perf_counter() - started < 1.0  # cheap enough for every report
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert record["commit"] == head and isinstance(record["dirty"], bool)
    assert record["script"] == "bench/quantize.py" and len(record["script_sha256"]) == 64
    assert record["sources_sha256"] == provenance.record()["sources_sha256"]  # stable from call to call
    versions = record["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["ftq"] and versions["numpy"] and set(provenance.DISTRIBUTIONS) <= set(versions)
    assert record["machine"]["cores"] >= 1 and set(record["machine"]["cpu_flags"]) <= set(provenance.CPU_FLAGS)


def test_the_record_imports_no_heavy_package():
    """Versions come from package metadata: a report written by a light command stays light."""
    code = "import sys; from ftq import provenance; provenance.record(); print(sorted({'torch', 'transformers', " \
           "'peft', 'trl', 'mlflow', 'dvc', 'lm_eval', 'llama_cpp'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_sources_hash_follows_paths_and_bytes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "sub" / "b.py").write_text("B = 2\n")
    (tmp_path / "notes.txt").write_text("not source\n")
    first = provenance.sources_sha256(tmp_path)
    (tmp_path / "notes.txt").write_text("changed, still not source\n")
    assert provenance.sources_sha256(tmp_path) == first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")  # the same bytes under another path
    assert provenance.sources_sha256(tmp_path) != first


def test_without_git_the_fields_are_none_and_nothing_raises(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("{}\n")  # a project root that is no git repository
    monkeypatch.chdir(tmp_path)
    record = provenance.record()
    assert record["commit"] is None and record["dirty"] is None and "script" not in record
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert provenance.record()["commit"] is None
    assert provenance.stamp({"steps": 3})["steps"] == 3
