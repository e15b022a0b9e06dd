import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import project_env
from ftq.processes import free_port

SUBCOMMANDS = [["run"], ["base"], ["base", "run"], ["base", "ask"], ["prepare"], ["data"], ["data", "check"],
               ["data", "make-default"], ["ui"]]


def ftq(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ftq", *args], capture_output=True, text=True, timeout=120, **kwargs)


def test_help_lists_every_subcommand():
    result = ftq("--help")
    assert result.returncode == 0
    for name in ("run", "base", "prepare", "data", "ui"):
        assert f"    {name} " in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command):
    result = ftq(*command, "--help")
    assert result.returncode == 0 and "usage: ftq" in result.stdout


def test_console_script_is_installed():
    from pathlib import Path

    script = Path(sys.executable).parent / "ftq"
    assert script.exists()
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout.startswith("ftq ")


def test_missing_params_file_is_a_clear_error(tmp_path):
    result = ftq("prepare", "--params", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "nope.yaml: no such params file" in result.stderr


def test_ui_serves_the_project_store(project):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftq", "ui", "--port", str(port)],
        cwd=project, env=project_env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.read().decode().strip() == "OK"
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"MLflow UI did not start:\n{proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(1)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10", timeout=10
        ) as response:
            assert response.status == 200
        assert (project / "mlflow.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # mlflow server's own workers (uvicorn, job consumers) stop with it
    deadline = time.time() + 20
    while (left := _processes_mentioning(str(project / "mlflow.db"))) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, left


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command[:200])
    return found


def test_ftq_params_shows_each_settings_value_and_where_it_came_from(tmp_path):
    """`ftq params`: the effective value of every setting of a block, from -S, params.yaml or the default."""
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["train"]["seed"]  # left out: the stage's default applies
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "ftq", "params", "train", "-S", "train.learning_rate=1e-3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert rows["train.learning_rate"] == ["0.001", "(-S)"]
    assert rows["train.seed"] == ["42", "(default)"]
    assert rows["train.method"] == ["lora", "(params.yaml)"] and rows["train.lora.rank"] == ["16", "(params.yaml)"]
    assert not any(key.startswith("evaluate.") for key in rows)
    typo = subprocess.run([sys.executable, "-m", "ftq", "params", "train", "-S", "train.learnig_rate=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "train.learnig_rate: unknown key (did you mean learning_rate?)" in typo.stderr
    invalid = subprocess.run([sys.executable, "-m", "ftq", "params", "train", "-S", "evaluate.task_examples=many"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert invalid.returncode == 2 and "evaluate.task_examples: expected an integer >= 0, got 'many'" in invalid.stderr


def test_ftq_params_explain_prints_each_settings_default_accepted_values_and_help():
    """`ftq params --explain`: from the schema alone (no params.yaml here), for a block or a dotted prefix."""
    from ftq import schema

    result = ftq("params", "--explain", "promote.policy", cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("promote.policy.metric: task_json_field_accuracy\n    accepts ")
    assert all(metric in result.stdout for metric in schema.PAIRED_METRICS)
    assert "\n    absolute: points of the metric | relative: a share of merged's mean\n" in result.stdout
    assert "promote.model_name" not in result.stdout and "train." not in result.stdout
    unknown = ftq("params", "--explain", "train.lorra", cwd="/")
    assert unknown.returncode == 2 and "--explain train.lorra: no such setting" in unknown.stderr
