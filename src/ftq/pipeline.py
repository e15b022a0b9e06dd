"""`ftq run`: a thin wrapper over `dvc repro` / `dvc exp run` that opens one MLflow pipeline run and
makes every stage run that DVC executes its child (through $FTQ_PARENT_RUN_ID)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ftq import tracking
from ftq.errors import UsageError
from ftq.params import load_params, repo_root
from ftq.processes import stop_group


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
    code = subprocess.call(command, cwd=root, env=env)
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}'")
    if code == 0 and not children:
        client.delete_run(run_id)  # nothing ran: every stage was up to date or restored from cache
        print("ftq: every stage was up to date; no MLflow runs were created", file=sys.stderr)
    else:
        client.set_terminated(run_id, "FINISHED" if code == 0 else "FAILED")
        print(f"ftq: {len(children)} stage run(s) logged under pipeline run {run_id}", file=sys.stderr)
    return code


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
