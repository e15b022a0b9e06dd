import json

import pytest

from conftest import load_params, mlflow_runs
from ftq import tracking
from ftq.params import flatten, params_hash


def test_flatten_and_hash():
    assert flatten({"lora": {"rank": 8, "targets": ["q", "v"]}, "lr": 1e-4}, "train.") == {
        "train.lora.rank": 8, "train.lora.targets": '["q", "v"]', "train.lr": 0.0001,
    }
    assert params_hash({"a": 1, "b": 2}) == params_hash({"b": 2, "a": 1}) != params_hash({"a": 2})


def test_stage_run_logs_params_metrics_series_and_status(project):
    params = load_params(project)
    with tracking.stage_run("prepare", params, block_name="data") as run:
        run.log_metrics({"loss": 1.5, "flag": True, "text": "x"})
        run.log_metric_series("train_loss", [(i, 2.0 - i / 10) for i in range(2500)])
    with pytest.raises(RuntimeError):
        with tracking.stage_run("base", params):
            raise RuntimeError("boom")
    runs = {r.data.tags["ftq.stage"]: r for r in mlflow_runs(project)}
    assert runs["prepare"].info.status == "FINISHED" and runs["base"].info.status == "FAILED"
    assert runs["prepare"].data.params["data.datasets"] == '["ftq_default", "ftq_default_replay", "ftq_default_heldout"]'
    assert set(runs["prepare"].data.metrics) == {"loss", "train_loss"}
    history = runs["prepare"].data.metrics
    assert history["train_loss"] == pytest.approx(2.0 - 2499 / 10)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri(params))
    assert len(client.get_metric_history(runs["prepare"].info.run_id, "train_loss")) == 2500
    assert runs["prepare"].data.tags["params.hash"] == params_hash(params["data"])
    log = [json.loads(line) for line in (project / ".ftq" / "runs.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["status"]) for e in log] == [
        ("prepare", "RUNNING"), ("prepare", "FINISHED"), ("base", "RUNNING"), ("base", "FAILED")]


def test_tracking_uri_override(project, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    with tracking.stage_run("base", load_params(project)):
        pass
    assert (tmp_path / "other.db").exists()


def test_one_process_logs_each_project_into_its_own_store(project, tiny_model_dir, tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; left there, the next project in the same
    process (a notebook, a test worker, `ftq` driving stages in-process) logged into the first one's store."""
    from conftest import make_project

    with tracking.stage_run("base", load_params(project)):
        pass
    second = make_project(tmp_path / "second", tiny_model_dir)
    monkeypatch.chdir(second)
    assert tracking.tracking_uri(load_params(second)) == f"sqlite:///{second / 'mlflow.db'}"
    with tracking.stage_run("base", load_params(second)):
        pass
    assert (second / "mlflow.db").exists()


def test_a_tracking_uri_the_user_set_survives_a_client(project, monkeypatch, tmp_path):
    chosen = f"sqlite:///{tmp_path / 'chosen.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", chosen)
    tracking.client(load_params(project))
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == chosen
