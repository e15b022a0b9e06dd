"""What the registry leaves behind when things fail: uploads made under the lock, reused on retry and
read back before a version exists; a lock that a live holder keeps and a dead one loses; download
leftovers swept; `ftq registry gc`. A small real build (a file and its manifest) in a real sqlite
MLflow store under tmp_path: no pipeline run, seconds per test."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ftq.registry import ARTIFACT_TAG, FILES_TAG, build_digest
from ftq.registry.upload import REGISTERED_TAG, UploadVerificationError, stored_files, upload_build
from ftq.stages import promote

MODEL = "hard"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A project root with a sqlite MLflow store; the working directory is its root."""
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    from ftq.tracking import client, experiment_id

    params = {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ftq"}}
    mlflow_client = client(params)
    promote.ensure_registered_model(mlflow_client, MODEL)
    return tmp_path, params, mlflow_client, experiment_id(mlflow_client, params)


def make_build(root: Path, name: str = "tiny", content: bytes = b"") -> dict:
    """models/quantized/<name>/ as quantize writes it: the artifact and a manifest with its sha256."""
    folder = root / "models" / "quantized" / name
    folder.mkdir(parents=True, exist_ok=True)
    data = content or os.urandom(64 * 1024)
    (folder / "model.gguf").write_bytes(data)
    manifest = {"name": name, "method": "gguf", "format": "gguf", "artifact": "model.gguf", "options": {"type": "q8_0"},
                "size_bytes": len(data), "check": {"passed": True}, "source": {"lineage": {}},
                "files": {"model.gguf": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def candidate(manifest: dict) -> dict:
    return {"name": manifest["name"], "manifest": manifest, "metrics": {"task_json_field_accuracy": 0.5}}


def logged_models(client, exp_id):
    return list(client.search_logged_models([exp_id]))


def artifact_dir(client, model_id) -> Path:
    from mlflow.utils.file_utils import local_file_uri_to_path

    return Path(local_file_uri_to_path(client.get_logged_model(model_id).artifact_location))


def model_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("mlartifacts/*/models/*"))


# --- upload under the lock, reused on retry ---------------------------------------------------------------

def test_a_promote_that_dies_after_the_upload_is_retried_with_the_same_logged_model(store, monkeypatch):
    root, params, client, exp_id = store
    manifest = make_build(root)

    def crash(*args, **kwargs):  # fault injection: the process dies between upload and version creation
        raise RuntimeError("simulated crash before the version exists")

    with monkeypatch.context() as patch:
        patch.setattr(client, "create_model_version", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            promote.register(client, MODEL, candidate(manifest), root, params, exp_id)
    [first] = logged_models(client, exp_id)
    assert str(first.status) == "READY" and not client.search_model_versions(f"name = '{MODEL}'")
    assert not client.search_registered_models(f"name = '{MODEL}.lock'")  # released despite the crash

    version, created = promote.register(client, MODEL, candidate(manifest), root, params, exp_id)
    assert created and [m.model_id for m in logged_models(client, exp_id)] == [first.model_id]  # no second copy
    registered = client.get_model_version(MODEL, version)
    assert registered.source == f"models:/{first.model_id}"
    assert json.loads(registered.tags[FILES_TAG]) == json.loads(first.tags[FILES_TAG])
    assert model_dirs(root) == [first.model_id]
    assert promote.register(client, MODEL, candidate(manifest), root, params, exp_id) == (version, False)


def test_an_upload_killed_midway_is_deleted_and_uploaded_again(store):
    from mlflow.entities import LoggedModelStatus

    root, params, client, exp_id = store
    manifest = make_build(root)
    # what a SIGKILL during log_model_artifacts leaves: a PENDING logged model holding part of the files
    dead = client.create_logged_model(exp_id, name="tiny", tags={ARTIFACT_TAG: build_digest(manifest),
                                                                 REGISTERED_TAG: MODEL, "ftq.build": "tiny"})
    partial = root / "partial"
    (partial / "build").mkdir(parents=True)
    (partial / "build" / "model.gguf").write_bytes(b"half of it")
    client.log_model_artifacts(dead.model_id, str(partial))
    assert client.get_logged_model(dead.model_id).status == LoggedModelStatus.PENDING

    logged = upload_build(client, MODEL, exp_id, "tiny", root / "models/quantized/tiny", manifest, None, root / ".ftq")
    assert [m.model_id for m in logged_models(client, exp_id)] == [logged.model_id] != [dead.model_id]
    assert model_dirs(root) == [logged.model_id]  # the partial files went with it


# --- read-back verification -------------------------------------------------------------------------------

def test_a_truncated_upload_is_refused_and_deleted(store):
    root, params, client, exp_id = store
    manifest = make_build(root)

    def truncate(model_id):  # the store lost the end of the file (a full disk, a dropped connection)
        stored = artifact_dir(client, model_id) / "build" / "model.gguf"
        stored.write_bytes(stored.read_bytes()[:1000])

    with pytest.raises(UploadVerificationError, match=r"logged model m-\w+: the artifact store does not hold the "
                                                      r"uploaded bytes: build/model.gguf has sha256 \w+, the upload "
                                                      r"recorded \w+"):
        upload_build(client, MODEL, exp_id, "tiny", root / "models/quantized/tiny", manifest, None, root / ".ftq",
                     after_upload=truncate)
    assert logged_models(client, exp_id) == [] and model_dirs(root) == []
    assert not list((root / ".ftq").glob("*.tmp-*"))

    # a failed upload (here: the disk filled up) leaves no partial files either
    def disk_full(model_id):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        upload_build(client, MODEL, exp_id, "tiny", root / "models/quantized/tiny", manifest, None, root / ".ftq",
                     after_upload=disk_full)
    assert logged_models(client, exp_id) == [] and model_dirs(root) == []


def test_a_reused_upload_is_read_back_first(store, monkeypatch):
    root, params, client, exp_id = store
    manifest = make_build(root)
    monkeypatch.setattr(client, "create_model_version", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        promote.register(client, MODEL, candidate(manifest), root, params, exp_id)
    monkeypatch.undo()
    [orphan] = logged_models(client, exp_id)
    stored = artifact_dir(client, orphan.model_id) / "build" / "model.gguf"
    stored.write_bytes(b"rotted")  # corrupted in the store since
    version, _ = promote.register(client, MODEL, candidate(manifest), root, params, exp_id)
    [fresh] = logged_models(client, exp_id)
    assert fresh.model_id != orphan.model_id
    assert client.get_model_version(MODEL, version).source == f"models:/{fresh.model_id}"
    files = stored_files(client, fresh.model_id, root / ".ftq")
    assert files == json.loads(fresh.tags[FILES_TAG])
