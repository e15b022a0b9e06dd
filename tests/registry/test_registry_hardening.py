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
from ftq.promotion.policy import Candidate
from ftq.registry.versions import ensure_registered_model, register

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
    ensure_registered_model(mlflow_client, MODEL)
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


def candidate(manifest: dict) -> Candidate:
    return Candidate(manifest["name"], manifest=manifest, metrics={"task_json_field_accuracy": 0.5})


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
            register(client, MODEL, candidate(manifest), root, params, exp_id)
    [first] = logged_models(client, exp_id)
    assert str(first.status) == "READY" and not client.search_model_versions(f"name = '{MODEL}'")
    assert not client.search_registered_models(f"name = '{MODEL}.lock'")  # released despite the crash

    version, created = register(client, MODEL, candidate(manifest), root, params, exp_id)
    assert created and [m.model_id for m in logged_models(client, exp_id)] == [first.model_id]  # no second copy
    registered = client.get_model_version(MODEL, version)
    assert registered.source == f"models:/{first.model_id}"
    assert json.loads(registered.tags[FILES_TAG]) == json.loads(first.tags[FILES_TAG])
    assert model_dirs(root) == [first.model_id]
    assert register(client, MODEL, candidate(manifest), root, params, exp_id) == (version, False)


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
        register(client, MODEL, candidate(manifest), root, params, exp_id)
    monkeypatch.undo()
    [orphan] = logged_models(client, exp_id)
    stored = artifact_dir(client, orphan.model_id) / "build" / "model.gguf"
    stored.write_bytes(b"rotted")  # corrupted in the store since
    version, _ = register(client, MODEL, candidate(manifest), root, params, exp_id)
    [fresh] = logged_models(client, exp_id)
    assert fresh.model_id != orphan.model_id
    assert client.get_model_version(MODEL, version).source == f"models:/{fresh.model_id}"
    files = stored_files(client, fresh.model_id, root / ".ftq")
    assert files == json.loads(fresh.tags[FILES_TAG])


# --- the lock: renewed by a live holder, broken only when its holder is dead -----------------------------

def test_stale_reason_is_about_liveness_not_age():
    from ftq.registry.lock import Holder, holder_of, stale_reason

    alive, dead = (lambda pid: True), (lambda pid: False)
    fresh = Holder("h:1:x", "h", 1, heartbeat=1000.0)
    assert stale_reason(fresh, 1000.0 + 599, 600, "h", alive) is None  # held for long, renewed recently
    assert "no heartbeat for 601 s" in stale_reason(fresh, 1000.0 + 601, 600, "h", alive)
    assert "process 1 on this host (h) is gone" in stale_reason(fresh, 1001.0, 600, "h", dead)
    assert stale_reason(fresh, 1001.0, 600, "other-host", dead) is None  # another host's pids mean nothing here
    old = holder_of({"ftq.lock.owner": "h:1:x", "ftq.lock.since": "5"})  # written before heartbeats existed
    assert old.heartbeat == 5.0 and old.pid is None and stale_reason(old, 700.0, 600, "h", dead)


HOLDER = textwrap.dedent("""
    import sys, time
    from mlflow.tracking import MlflowClient
    from ftq.registry.lock import registry_lock

    with registry_lock(MlflowClient(sys.argv[1]), "m", stale_after=float(sys.argv[2])):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_live_holder_keeps_the_lock_past_the_limit_and_a_killed_one_loses_it(tmp_path):
    from ftq.registry.lock import RegistryBusy, lock_name, registry_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.search_registered_models()  # the store exists before two processes open it
    limit = 3.0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, uri, str(limit)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        # three limits long: a lock judged by its age alone would be broken within the first
        with pytest.raises(RegistryBusy, match=r"m.lock is held by .*:%d:\w+, which is alive" % holder.pid):
            with registry_lock(client, "m", wait=3 * limit, stale_after=limit):
                pytest.fail("a live holder's lock was broken")
        assert time.monotonic() - started >= 3 * limit and holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    # killed: its heartbeat stops and its pid is gone on this host, so it is broken at once, even
    # with a limit far longer than it has been silent
    started = time.monotonic()
    with registry_lock(client, "m", wait=30, stale_after=600) as owner:
        assert client.get_registered_model(lock_name("m")).tags["ftq.lock.owner"] == owner
        assert time.monotonic() - started < 20
    assert not client.search_registered_models()


def test_the_heartbeat_renews_the_lock(tmp_path):
    from ftq.registry.lock import HEARTBEAT_TAG, lock_name, registry_lock

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with registry_lock(client, "m", stale_after=2.0):
        first = float(client.get_registered_model(lock_name("m")).tags[HEARTBEAT_TAG])
        time.sleep(2.5)
        assert float(client.get_registered_model(lock_name("m")).tags[HEARTBEAT_TAG]) > first + 1


# --- download leftovers -----------------------------------------------------------------------------------

def test_download_leftovers_of_dead_or_old_writers_are_swept(tmp_path):
    from ftq.registry.resolve import leftover_is_stale, sweep_leftovers

    alive, dead = (lambda pid: True), (lambda pid: False)
    assert leftover_is_stale("abc.tmp-123-xyz", 5, 3600, dead)
    assert not leftover_is_stale("abc.tmp-123-xyz", 5, 3600, alive)
    assert leftover_is_stale("abc.tmp-123-xyz", 3601, 3600, alive)  # its pid was reused since
    assert not leftover_is_stale("abc.tmp-k3j_x9aq", 5, 3600, dead)  # an older name, no pid: by age only

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cache = tmp_path / "registry"
    for name in (f"aa.tmp-{gone.pid}-x1", f"bb.tmp-{os.getpid()}-x2", f"cc.tmp-{os.getpid()}-x3", "dd"):
        (cache / name / "build").mkdir(parents=True)
        (cache / name / "build" / "model.gguf").write_bytes(b"part")
    day_old = time.time() - 2 * 24 * 3600
    os.utime(cache / f"cc.tmp-{os.getpid()}-x3", (day_old, day_old))
    swept = sweep_leftovers(cache)
    assert sorted(p.name for p in swept) == [f"aa.tmp-{gone.pid}-x1", f"cc.tmp-{os.getpid()}-x3"]
    assert sorted(p.name for p in cache.iterdir()) == [f"bb.tmp-{os.getpid()}-x2", "dd"]


# --- gc ---------------------------------------------------------------------------------------------------

def test_gc_plan_keeps_what_an_alias_needs_and_the_newest_per_build():
    from ftq.registry.gc import Upload, Version, plan

    versions = [Version("1", "q4", ("champion",), "m-1"), Version("2", "q4", (), "m-2"), Version("3", "q4", (), "m-3"),
                Version("4", "q4", (), "m-4"), Version("5", "q8", (), "m-5"), Version("6", "q8", ("challenger",), "m-6"),
                Version("7", "q8", (), "m-shared")]
    uploads = [Upload(f"m-{i}", "q4" if i < 5 else "q8", "READY") for i in range(1, 7)] + \
        [Upload("m-orphan", "q4", "READY"), Upload("m-dead", "q8", "PENDING")]
    decided = plan(versions, uploads, keep=2)
    assert decided.kept == {"1": "alias champion", "6": "alias challenger", "4": "one of the newest 2 of build q4",
                            "3": "one of the newest 2 of build q4", "7": "one of the newest 2 of build q8"}
    assert sorted(decided.versions) == ["2", "5"]
    assert sorted(decided.logged_models) == ["m-2", "m-5", "m-dead", "m-orphan"]
    # a logged model another registered model's version uses is never deleted
    assert "m-5" not in plan(versions, uploads, keep=2, elsewhere=frozenset({"m-5"})).logged_models
    assert plan(versions, uploads, keep=10).versions == {}


def test_registry_gc_deletes_unneeded_versions_and_uploads(store, capsys):
    from ftq import cli

    root, params, client, exp_id = store
    made = []
    for _ in range(4):  # four rebuilds of the same build: four versions
        manifest = make_build(root)
        made.append(register(client, MODEL, candidate(manifest), root, params, exp_id)[0])
    client.set_registered_model_alias(MODEL, "champion", made[0])
    orphan = upload_build(client, MODEL, exp_id, "other", root / "models/quantized/other", make_build(root, "other"),
                          None, root / ".ftq")
    source = {v: client.get_model_version(MODEL, v).source[len("models:/"):] for v in made}
    (root / "params.yaml").write_text(json.dumps({**params, "promote": {"model_name": MODEL}}))

    from ftq.errors import UsageError

    def registry_gc(*argv):  # the command as `ftq registry gc` runs it, in this process
        args = cli.build_parser().parse_args(["registry", "gc", *argv])
        return args.func(args)

    with pytest.raises(UsageError, match="registry gc: no registered model nothing-here"):
        registry_gc("--model-name", "nothing-here")
    assert registry_gc("--keep", "2") == 0
    out = capsys.readouterr().out
    assert f"version {made[0]}: keep (alias champion)" in out
    assert f"version {made[1]}: delete" in out and f"logged model {orphan.model_id}: delete" in out
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 4  # a dry run by default

    assert registry_gc("--keep", "2", "--delete") == 0
    left = sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    assert left == sorted([made[0], made[2], made[3]])  # the champion, and the newest two
    assert sorted(m.model_id for m in logged_models(client, exp_id)) == sorted(source[v] for v in left)
    assert model_dirs(root) == sorted(source[v] for v in left)  # their files went too
    assert not client.search_registered_models(f"name = '{MODEL}.lock'")
