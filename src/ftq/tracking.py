"""MLflow plumbing shared by every stage: one run per stage execution, nested under the pipeline
run that `ftq run` opens, with the stage's params block, batched metrics, artifacts and lineage tags.

Run ids are appended to `.ftq/runs.jsonl`, a file no DVC stage depends on: writing them into a
stage output would change it on every run and make DVC rerun everything downstream."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from ftq.params import flatten, params_hash, repo_root, store_root
from ftq.processes import owner_pid, pid_alive

PARENT_RUN_ENV = "FTQ_PARENT_RUN_ID"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def _tracking(params: dict[str, Any] | None) -> dict[str, Any]:
    from ftq import schema

    return schema.settings(params or {}, "tracking")


def tracking_uri(params: dict[str, Any] | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    configured = _tracking(params)["uri"]
    if configured:
        return configured
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def artifact_root() -> Path:
    return store_root() / "mlartifacts"


def client(params: dict[str, Any] | None = None):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params)
    # MLflow's own code sometimes opens a default client (the registry resolving a `models:/<model_id>`
    # source does): point the process-wide URI at the same store. mlflow.set_tracking_uri also writes
    # $MLFLOW_TRACKING_URI, which tracking_uri() reads as the user's choice: left there, every later
    # project in this process (and every child process) would log into this one's store
    user_choice = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_choice is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_choice
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, params: dict[str, Any] | None = None) -> str:
    name = _tracking(params)["experiment"]
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if tracking_uri(params).startswith("sqlite:"):
        location = (artifact_root() / name).as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def git_rev(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or repo_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def data_md5(root: Path | None = None) -> str:
    manifest = (root or repo_root()) / "data" / "processed" / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("md5", "")
    except (OSError, ValueError):
        return ""


def lineage_tags(stage: str, params: dict[str, Any], block_name: str | None = None,
                 stage_block: dict[str, Any] | None = None) -> dict[str, str]:
    if stage_block is None:
        stage_block = params.get(block_name or stage)
        stage_block = stage_block if isinstance(stage_block, dict) else {}
    return {
        "ftq.stage": stage,
        "git.rev": git_rev(),
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "dvc.exp": os.environ.get("DVC_EXP_NAME", ""),
        "data.md5": data_md5(),
        "params.hash": params_hash(stage_block),
    }


def latest_run_id(stage: str, params: dict[str, Any], block_name: str | None = None) -> str:
    """The newest FINISHED run of `stage` made with the current params block and data, or "".
    Used for lineage in model cards; never stored in a file a DVC stage depends on for skipping."""
    try:
        mlflow_client = client(params)
        found = mlflow_client.get_experiment_by_name(_tracking(params)["experiment"])
        if found is None:
            return ""
        stage_block = params.get(block_name or stage)
        query = (f"tags.`ftq.stage` = '{stage}' and attributes.status = 'FINISHED' "
                 f"and tags.`params.hash` = '{params_hash(stage_block if isinstance(stage_block, dict) else {})}'")
        runs = mlflow_client.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"],
                                         max_results=1)
    except Exception:  # lineage is best effort: a missing store must not fail a stage
        return ""
    return runs[0].info.run_id if runs else ""


class StageRun:
    """A thin handle on one MLflow run; every call goes through the client, no global fluent state."""

    def __init__(self, mlflow_client, run_id: str):
        self.client = mlflow_client
        self.run_id = run_id

    def log_params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in values.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100], synchronous=True)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000], synchronous=True)

    def log_metric_series(self, name: str, points: list[tuple[int, float]]) -> None:
        """A whole step-wise curve in batches (loss curves have thousands of points)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, int(s)) for s, v in points]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000], synchronous=True)

    def set_tags(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def _runs_log() -> Path:
    return store_root() / ".ftq" / "runs.jsonl"


def _record_run_id(stage: str, run_id: str, parent: str | None, status: str) -> None:
    log = _runs_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    entry = {"stage": stage, "run_id": run_id, "parent": parent, "status": status, "pid": owner_pid(),
             "time": time.time()}
    with open(log, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def close_killed_runs(mlflow_client) -> list[str]:
    """Runs whose process died without ending them (kill -9, power loss) stay RUNNING in MLflow forever;
    mark them KILLED. Each run's last line in .ftq/runs.jsonl tells its status and process."""
    log = _runs_log()
    if not log.exists():
        return []
    latest: dict[str, dict] = {}
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        latest[entry["run_id"]] = entry
    killed = []
    for run_id, entry in latest.items():
        if entry.get("status") == "RUNNING" and entry.get("pid") and not pid_alive(entry["pid"]):
            try:
                if mlflow_client.get_run(run_id).info.status == "RUNNING":
                    mlflow_client.set_terminated(run_id, "KILLED")
            except Exception:  # the run may have been deleted from the store
                pass
            _record_run_id(entry["stage"], run_id, entry.get("parent"), "KILLED")
            killed.append(run_id)
    return killed


def dvc_experiment_run(mlflow_client, exp_id: str) -> str | None:
    """The pipeline run of the DVC experiment this stage runs in, when DVC runs it without `ftq run`
    (`dvc exp run --queue` then `dvc queue start`, `--temp`, or plain): found by the experiment's name
    ($DVC_EXP_NAME, which DVC sets for each experiment's stages), or opened by its first stage."""
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return None
    found = mlflow_client.search_runs(
        [exp_id], f"tags.`ftq.stage` = 'pipeline' and tags.`dvc.exp` = '{name}'", max_results=1)
    if found:
        mlflow_client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {"ftq.stage": "pipeline", "dvc.exp": name, "ftq.command": "dvc exp run",
            "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""), "git.rev": git_rev()}
    return mlflow_client.create_run(exp_id, run_name=name, tags=tags).info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str, params: dict[str, Any], block_name: str | None = None, run_name: str | None = None,
    block_values: dict[str, Any] | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run for one stage execution; it ends FINISHED, or FAILED if the stage raises.
    Its params are the stage's params.yaml block (`block_name`, default the stage's own name), flattened,
    or `block_values` for a foreach stage that uses one entry of its block (one quantized build)."""
    block_name = block_name or stage
    mlflow_client = client(params)
    exp_id = experiment_id(mlflow_client, params)
    close_killed_runs(mlflow_client)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    experiment_parent = None if parent else dvc_experiment_run(mlflow_client, exp_id)
    parent = parent or experiment_parent
    tags = lineage_tags(stage, params, block_name, block_values)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = mlflow_client.create_run(exp_id, run_name=run_name or stage, tags=tags)
    _record_run_id(stage, run.info.run_id, parent, "RUNNING")
    handle = StageRun(mlflow_client, run.info.run_id)
    stage_block = block_values
    if stage_block is None:  # the effective values: params.yaml's, with the schema's defaults for what it leaves out
        from ftq import schema

        given = params.get(block_name)
        stage_block = ((schema.settings(params, block_name) if block_name in schema.SCHEMA else given)
                       if isinstance(given, dict) else {})
    handle.log_params(flatten(stage_block, f"{block_name}."))
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM (ftq.processes.Stopped)
        status = "KILLED"
        raise
    finally:
        mlflow_client.set_terminated(run.info.run_id, status)
        _record_run_id(stage, run.info.run_id, parent, status)
        if experiment_parent:  # the experiment's state so far: its next stage sets it RUNNING again
            mlflow_client.set_terminated(experiment_parent, status)
