"""The registry holds what it promotes: versions are logged copies in MLflow's artifact store, verified
on every load, loadable by MLflow itself, and the champion moves by compare-and-set."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_POLICY, load_params, project_env, set_params, set_scores, start_server, stop
from ftq.io import file_sha256
from ftq.registry import FILES_TAG, MODEL_TAG
from ftq.registry.aliases import DECIDE_DELAY_ENV
from ftq.registry.resolve import VerificationError, resolve
from ftq.stages import promote, quantize

# the tiny random model gets no JSON field right: merged is given a score to retain, and no retention is asked
POLICY = {"metric": "task_json_field_accuracy", **TINY_POLICY}


def registry(project):
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def promote_as(project, name, **policy):
    set_scores(project, "merged", 0.0)  # as the tiny model's builds score: both faithful
    set_params(project, promote={"model_name": name, "policy": {**POLICY, **policy}})
    return promote.run(load_params(project))


def chat(port, text="Hi", max_tokens=4):
    from openai import OpenAI

    api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
    return api.chat.completions.create(model="m", messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                                       temperature=0)


def elsewhere_env(project, tmp_path):
    """A second machine: an empty folder, the tracking store's URI and nothing else of the project."""
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "OMP_WAIT_POLICY": "PASSIVE",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "FTQ_CACHE": str(tmp_path / "cache2")}


def test_a_version_is_a_logged_copy_that_a_rebuild_never_changes(evaluated_copy, tmp_path):
    project = evaluated_copy
    original = file_sha256(project / "models" / "quantized" / "q8_0" / "model.gguf")
    report = promote_as(project, "immutable")
    client = registry(project)
    first = {v.tags["ftq.build"]: v for v in client.search_model_versions("name = 'immutable'")}
    assert set(first) == {"q8_0", "q4_0"}
    for version in first.values():
        assert version.source.startswith("models:/m-")  # an MLflow 3 logged model
        assert str(client.get_logged_model(version.source[len("models:/"):]).status) == "READY"
        location = client.get_model_version_download_uri("immutable", version.version)
        assert location.startswith((project / "mlartifacts").as_uri()), location  # the store, not models/
        files = json.loads(version.tags[FILES_TAG])
        assert {"MLmodel", "build/model.gguf", "build/manifest.json"} <= set(files)
    assert not any(r["registered_now"] for r in promote_as(project, "immutable")["candidates"])

    # rebuild q8_0 with other options: a new version; version 1 still serves its original bytes
    params = load_params(project)
    params["quantize"]["builds"]["q8_0"] = {"method": "gguf", "type": "q8_0", "output_type": "f16"}
    (project / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in params.items() if k != "_path"},
                                                        sort_keys=False))
    quantize.run(load_params(project), "q8_0")
    assert file_sha256(project / "models" / "quantized" / "q8_0" / "model.gguf") != original
    again = promote_as(project, "immutable")
    assert [r["name"] for r in again["candidates"] if r["registered_now"]] == ["q8_0"]
    versions = client.search_model_versions("name = 'immutable'")
    assert len(versions) == 3
    # the new version names the run that built it, as does its logged model
    [rebuilt] = [v for v in versions if v.version not in {f.version for f in first.values()}]
    experiment = client.get_experiment_by_name("ftq").experiment_id
    [quantize_run] = [r for r in client.search_runs([experiment]) if r.info.run_name == "quantize@q8_0"]
    assert rebuilt.run_id == quantize_run.info.run_id == rebuilt.tags["run_id.quantize"]
    assert client.get_logged_model(rebuilt.source[len("models:/"):]).source_run_id == quantize_run.info.run_id
    old = first["q8_0"].version
    resolved = resolve(f"models:/immutable/{old}", load_params(project))
    assert file_sha256(resolved.path) == original and resolved.sha256 == first["q8_0"].tags[MODEL_TAG]

    # models/ moved away: the champion is still served, from another folder, by URI alone
    shutil.move(project / "models", tmp_path / "models-elsewhere")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    process, port, health = start_server("models:/immutable@champion", cwd=elsewhere,
                                         env=elsewhere_env(project, tmp_path))
    try:
        assert health["version"] == report["champion"]["version"] and health["sha256"]
        assert health["path"].startswith(str(tmp_path / "cache2"))
        assert chat(port).choices[0].message.role == "assistant"
    finally:
        stop(process)
    process, port, health = start_server(f"models:/immutable/{old}", cwd=elsewhere,
                                         env=elsewhere_env(project, tmp_path))
    try:
        assert file_sha256(health["path"]) == original
    finally:
        stop(process)


def test_a_tampered_download_is_refused(evaluated_copy, tmp_path):
    project = evaluated_copy
    promote_as(project, "tamper")
    params = load_params(project)
    resolved = resolve("models:/tamper@champion", params)
    data = bytearray(resolved.path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte
    resolved.path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"build/model.gguf has sha256 .* the registry recorded"):
        resolve("models:/tamper@champion", params)
    result = subprocess.run([sys.executable, "-m", "ftq", "serve", "--model", "models:/tamper@champion"],
                            cwd=project, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 2 and "does not hold the registered bytes" in result.stderr
    assert "Nothing was loaded" in result.stderr

    # an extra file is refused too; deleting the cache entry downloads the version again
    cached = resolved.path.parent.parent
    shutil.rmtree(cached)
    resolve("models:/tamper@champion", params)
    (cached / "build" / "extra.gguf").write_bytes(b"x")
    with pytest.raises(VerificationError, match="unexpected build/extra.gguf"):
        resolve("models:/tamper@champion", params)


def test_mlflow_loads_and_serves_the_champion_through_the_pyfunc_flavor(evaluated_copy, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from ftq.processes import free_port, stop_group, wait_http

    project = evaluated_copy
    promote_as(project, "native")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri writes it; undone after the test
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/native@champion")
    answer = model.predict({"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 5,
                            "temperature": 0})
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= answer["usage"]["completion_tokens"] <= 5 and answer["usage"]["prompt_tokens"] > 0
    with pytest.raises(MlflowException, match="messages"):
        model.predict({"messages": "not a list"})
    # MLflow's loader has just written its registered_model_meta into the local artifact store:
    # a fresh download by ftq must still verify
    from unittest import mock

    from conftest import load_params
    from ftq.registry.resolve import resolve

    with mock.patch.dict(os.environ, {"FTQ_CACHE": str(tmp_path / "fresh-cache")}):
        assert resolve("models:/native@champion", load_params(project)).path.exists()

    port = free_port()
    log = tmp_path / "models-serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/native@champion", "--env-manager",
             "local", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={**project_env(project), "MLFLOW_TRACKING_URI": uri, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, 180, log)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            served = json.loads(response.read())
        assert served["object"] == "chat.completion" and served["choices"][0]["message"]["role"] == "assistant"
    finally:
        stop_group(server)


def test_concurrent_promotes_leave_the_champion_on_the_better_build(evaluated_copy, evaluated):
    """Two experiments finish together, each promoting one build: the better build must end up
    champion whichever writes last. Each process waits 6 s between reading the champion and moving it,
    and the worse one starts once the better one holds the registry lock (started any earlier, the
    slower start-up of either could order them differently). Without the lock and the compare-and-set,
    the worse one reads 'no champion' inside that window and its write lands last."""
    from ftq.registry.lock import lock_name

    project = evaluated_copy
    _, reports = evaluated
    # both score 0 on every example (the tiny random model), as merged does: both are faithful and neither
    # beats the other, so the smaller wins: the one the policy prefers when the two compete
    better, worse = sorted(("q8_0", "q4_0"), key=lambda n: reports[n]["size_bytes"])
    assert reports[better]["task_json_field_accuracy"] == reports[worse]["task_json_field_accuracy"] == 0
    set_scores(project, "merged", 0.0)
    client = registry(project)
    client.search_experiments()  # the store exists before the two processes open it
    params = yaml.safe_load((project / "params.yaml").read_text())
    # select: best, as the fixture sets it (smallest_faithful, the default, would keep the champion for another
    # reason: a larger pick never replaces a smaller faithful champion)
    params["promote"] = {"model_name": "race", "policy": {**POLICY, "select": "best"}}
    processes = []
    for name in (better, worse):
        params["quantize"]["enabled"] = [name]
        (project / f"params-{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "ftq", "promote", "--params", f"params-{name}.yaml"], cwd=project,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, DECIDE_DELAY_ENV: "6"}))
        deadline = time.time() + 180
        while name == better and not client.search_registered_models(f"name = '{lock_name('race')}'"):
            assert time.time() < deadline and processes[0].poll() is None, "the first promote never took the lock"
            time.sleep(0.1)
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert client.get_model_version_by_alias("race", "champion").tags["ftq.build"] == better, outputs
    assert "does not beat champion" in outputs[1], outputs[1]
    assert [m.name for m in client.search_registered_models()] == ["race"]  # the lock is gone


def test_the_registry_lock_waits_for_its_holder_and_breaks_a_stale_one(evaluated_copy):
    import threading

    from ftq.registry.lock import OWNER_TAG, SINCE_TAG, RegistryBusy, lock_name, registry_lock

    client = registry(evaluated_copy)
    order, held, release = [], threading.Event(), threading.Event()

    def second():
        with registry_lock(client, "m", wait=30):
            order.append("second")
            held.set()
            release.wait(30)

    with registry_lock(client, "m"):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(1.5)
        order.append("first")
    assert held.wait(30) and order == ["first", "second"]
    with pytest.raises(RegistryBusy, match=r"m.lock is held by .*waited 1 s"):
        with registry_lock(client, "m", wait=1):
            pass
    release.set()
    waiter.join(30)
    assert not client.search_registered_models()  # released

    # a lock whose holder died an hour ago is broken
    client.create_registered_model(lock_name("m"), tags={OWNER_TAG: "dead-host:1:x", SINCE_TAG: str(time.time() - 3600)})
    with registry_lock(client, "m", wait=5, stale_after=600) as owner:
        assert client.get_registered_model(lock_name("m")).tags[OWNER_TAG] == owner


def test_a_build_changed_after_quantize_is_not_registered(evaluated_copy):
    from ftq.registry.package import ChangedBuildError

    project = evaluated_copy
    gguf = project / "models" / "quantized" / "q4_0" / "model.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    with pytest.raises(ChangedBuildError, match=r"q4_0: the build changed since it was made \(model.gguf has sha256 "
                                                r".*manifest.json recorded"):
        promote_as(project, "changed")
    client = registry(project)
    versions = client.search_model_versions("name = 'changed'")
    assert all(v.tags["ftq.build"] != "q4_0" for v in versions)  # nothing registered for it
    assert not list((project / ".ftq").glob("*.tmp-*"))  # no staging left behind
