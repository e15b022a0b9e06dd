"""Team scale: the pipeline against `mlflow server --serve-artifacts` over PostgreSQL (both started here
on loopback), and a second machine that deploys the champion knowing only MLFLOW_TRACKING_URI."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_POLICY, load_params, set_params, start_server, stop
from ftq.io import file_sha256
from ftq.processes import free_port
from ftq.stages import promote, quantize


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    from ftq.tracking_server import Unavailable, postgres_bin, running

    try:
        postgres_bin()
    except Unavailable as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("tracking")
    # run as root, the cluster belongs to the postgres user, who cannot enter pytest's private temp folder
    cluster = Path(tempfile.mkdtemp(prefix="ftq-postgres-"))
    try:
        with running(folder, free_port(), free_port(), pg_folder=cluster) as uri:
            yield uri, folder
    finally:
        shutil.rmtree(cluster, ignore_errors=True)


def test_promote_on_the_team_server_then_serve_the_champion_from_an_empty_folder(tracking_server, evaluated_copy,
                                                                                  tmp_path, monkeypatch):
    uri, server_folder = tracking_server
    project = evaluated_copy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    quantize.run(load_params(project), "q4_0")  # a stage run on the server: the version's source run
    set_params(project, promote={"model_name": "team", "policy": TINY_POLICY})
    report = promote.run(load_params(project))
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("team", "champion")
    assert champion.version == report["champion"]["version"] and champion.source.startswith("models:/m-")
    assert client.get_model_version_download_uri("team", champion.version).startswith("mlflow-artifacts:/")
    [q4_0] = client.search_model_versions("name = 'team' and tags.`ftq.build` = 'q4_0'")
    assert q4_0.run_id and client.get_run(q4_0.run_id).info.run_name == "quantize@q4_0"
    stored = [p for p in (server_folder / "artifacts").rglob("model.gguf")]
    assert len(stored) == 2  # the server's artifact store holds both builds

    # a second machine: an empty folder, no models/, no DVC cache, no project; only the server's URI
    build = champion.tags["ftq.build"]
    expected = file_sha256(project / "models" / "quantized" / build / "model.gguf")
    empty = tmp_path / "second-machine"
    empty.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": uri}
    process, port, health = start_server("models:/team@champion", cwd=empty, env=env, inherit_env=False)
    try:
        assert (health["version"], health["alias"]) == (champion.version, "champion")
        assert health["path"].startswith(str(tmp_path / "home" / ".cache" / "ftq" / "registry"))
        assert file_sha256(health["path"]) == expected
        from openai import OpenAI

        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        reply = api.chat.completions.create(model="team", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
    finally:
        stop(process)
    assert list(empty.iterdir()) == []  # nothing written beside it
