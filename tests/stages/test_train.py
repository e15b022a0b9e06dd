import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import load_params, mlflow_runs, project_env, set_params
from ftq.params import ParamsError
from ftq.stages import base, prepare, train
from ftq.training.settings import TrainSettings

FAST = {"max_steps": 12, "per_device_batch_size": 4, "learning_rate": 5e-3, "eval_steps": 6, "save_steps": 6,
        "logging_steps": 1, "warmup": 0}


@pytest.fixture()
def prepared(project):
    params = load_params(project)
    base.run(params)
    prepare.run(params)
    return project


def adapter_tensors(root, folder="models/adapter"):
    return load_file(str(root / folder / "adapter_model.safetensors"))


def test_lora_trains_and_reports(prepared):
    set_params(prepared, train=FAST)
    result = train.run(load_params(prepared))
    out = prepared / "models" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "ftq_train.json"):
        assert (out / name).exists(), name
    report = json.loads((prepared / "reports" / "train.json").read_text())
    assert report == result.report
    assert report["steps"] == 12 and report["final_train_loss"] < report["first_train_loss"]
    assert report["eval_loss"] is not None and report["real_tokens_per_second"] > 0 and report["peak_memory_bytes"] > 0
    rows = (prepared / "reports" / "train_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,learning_rate,grad_norm,tokens_per_second" and len(rows) == 13
    assert len((prepared / "reports" / "eval_loss.csv").read_text().splitlines()) == 3  # steps 6 and 12
    assert (prepared / "reports" / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (prepared / "models" / "checkpoints" / "train").exists()  # removed after success
    [run] = [r for r in mlflow_runs(prepared) if r.data.tags["ftq.stage"] == "train"]
    assert run.data.params["train.method"] == "lora" and run.data.params["train.lora.rank"] == "16"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    for metric in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 12, metric
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "train.json", "train_loss.png"} <= artifacts


def test_full_fine_tuning(prepared):
    set_params(prepared, train={**FAST, "method": "full", "output_dir": "models/full", "max_steps": 3, "learning_rate": 1e-3})
    train.run(load_params(prepared))
    assert (prepared / "models" / "full" / "model.safetensors").exists()
    assert json.loads((prepared / "models" / "full" / "ftq_train.json").read_text())["method"] == "full"


def test_qlora_on_cpu_learns_through_evaluation(prepared):
    """4-bit NF4 base; evaluation mid-run must not freeze the adapter (bitsandbytes CPU repacking trap)."""
    set_params(prepared, train={**FAST, "method": "qlora", "max_steps": 8, "eval_steps": 2, "save_steps": 4})
    report = train.run(load_params(prepared)).report
    config = json.loads((prepared / "models" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16
    losses = [float(r.split(",")[1]) for r in (prepared / "reports" / "train_loss.csv").read_text().splitlines()[1:]]
    # gradients keep flowing after the evaluations at steps 2, 4 and 6
    assert losses[-1] < losses[2] and report["final_train_loss"] < report["first_train_loss"]
    assert all(float(r.split(",")[3]) > 0 for r in (prepared / "reports" / "train_loss.csv").read_text().splitlines()[3:])


def test_settings_validation(project):
    set_params(project, train={"method": "dora"})
    with pytest.raises(ParamsError, match="train.method: expected one of full, lora, qlora"):
        TrainSettings.from_params(load_params(project))
    set_params(project, train={"method": "full", "output_dir": "models/adapter"})
    with pytest.raises(ParamsError, match="set train.output_dir: models/full"):
        TrainSettings.from_params(load_params(project))
    set_params(project, train={"method": "lora", "learning_rate_typo": 1})
    with pytest.raises(ParamsError, match="learning_rate_typo: unknown key"):
        TrainSettings.from_params(load_params(project))
