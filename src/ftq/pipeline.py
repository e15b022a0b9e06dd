"""`ftq run`: a thin wrapper over `dvc repro` / `dvc exp run` that opens one MLflow pipeline run and
makes every stage run that DVC executes its child (through $FTQ_PARENT_RUN_ID)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ftq import tracking
from ftq.errors import UsageError
from ftq.io import atomic_write_json
from ftq.params import load_params, repo_root
from ftq.processes import stop_group
from ftq.provenance import stamp

# a report, not a DVC output or dependency: it holds no run ids, and no stage reads it
TIMES = Path("reports/pipeline_times.json")


def dvc_command(targets: list[str], experiment: bool, set_params: list[str], name: str | None, force: bool) -> list[str]:
    command = [sys.executable, "-m", "dvc"]
    if experiment:
        command += ["exp", "run"]
        for assignment in set_params:
            command += ["-S", assignment]
        if name:
            command += ["--name", name]
    else:
        if set_params:
            raise UsageError("-S/--set-param needs --exp (dvc exp run); plain repro reads params.yaml as it is")
        command += ["repro"]
    if force:
        command.append("--force")
    return command + list(targets)


def run_pipeline(
    targets: list[str] | None = None,
    experiment: bool = False,
    set_params: list[str] | None = None,
    name: str | None = None,
    force: bool = False,
) -> int:
    root = repo_root()
    params = load_params(root / "params.yaml")
    command = dvc_command(targets or [], experiment, set_params or [], name, force)
    client = tracking.client(params)
    exp_id = tracking.experiment_id(client, params)
    parent = client.create_run(
        exp_id,
        run_name=name or ("experiment" if experiment else "pipeline"),
        tags={"ftq.stage": "pipeline", "git.rev": tracking.git_rev(root), "ftq.command": " ".join(command[1:])},
    )
    run_id = parent.info.run_id
    env = dict(os.environ)
    env[tracking.PARENT_RUN_ENV] = run_id
    env["FTQ_PYTHON"] = sys.executable  # bin/ftq, run by DVC, uses the same interpreter as this process
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    print(f"ftq: pipeline run {run_id}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    status = "FAILED"
    try:
        code = _run_dvc(command, root, env)
        status = "FINISHED" if code == 0 else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}'")
        if status == "FINISHED" and not children:
            client.delete_run(run_id)  # nothing ran: every stage was up to date or restored from cache
            print("ftq: every stage was up to date; no MLflow runs were created", file=sys.stderr)
        else:
            client.set_terminated(run_id, status)
            times = write_pipeline_times(root / TIMES, client.get_run(run_id), children, command)
            print(f"ftq: {len(children)} stage run(s) logged under pipeline run {run_id} ({status}); "
                  f"stage times in {TIMES}:\n{times_table(times)}", file=sys.stderr)
    return code


def _run_dvc(command: list[str], root: Path, env: dict) -> int:
    """DVC in the foreground. A stop (Ctrl-C, SIGTERM) is passed on to DVC as SIGINT, which DVC hands
    to the running stage (it then removes its temp outputs and ends its MLflow run KILLED); DVC gets a
    minute to return before it is killed."""
    process = subprocess.Popen(command, cwd=root, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def write_pipeline_times(path: Path, parent, children, command: list[str]) -> dict:
    """Each stage's wall time in the last `ftq run`, from its MLflow runs (start to end), in run order."""
    stages = [{"stage": r.info.run_name, "status": r.info.status,
               "seconds": round(((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000, 1)}
              for r in sorted(children, key=lambda r: r.info.start_time)]
    times = {"command": " ".join(command[2:]), "status": parent.info.status,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(parent.info.start_time / 1000)),
             "wall_seconds": round(((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000, 1),
             "stage_seconds": round(sum(s["seconds"] for s in stages), 1), "stages": stages}
    atomic_write_json(path, stamp(times))
    return times


def times_table(times: dict) -> str:
    rows = [f"  {s['stage']:<24} {s['seconds']:>8.1f} s  {s['status']}" for s in times["stages"]]
    return "\n".join(rows + [f"  {'total (wall)':<24} {times['wall_seconds']:>8.1f} s"])


def ui(host: str = "127.0.0.1", port: int = 5000) -> int:
    """The MLflow UI over this project's store."""
    params = load_params(repo_root() / "params.yaml") if (repo_root() / "params.yaml").exists() else {}
    uri = tracking.tracking_uri(params)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", tracking.artifact_root().as_uri(),
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    print(f"ftq: MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it", file=sys.stderr, flush=True)
    server = subprocess.Popen(command, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(server)
