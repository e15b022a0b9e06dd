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
from ftq.processes import free_port
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
    assert len((prepared / "reports" / "eval_loss.csv").read_text().splitlines()) == 4  # steps 0, 6 and 12
    assert report["initial_eval_loss"] > report["eval_loss"]
    assert (prepared / "reports" / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (prepared / "models" / "checkpoints" / "train").exists()  # removed after success
    [run] = [r for r in mlflow_runs(prepared) if r.data.tags["ftq.stage"] == "train"]
    assert run.data.params["train.method"] == "lora" and run.data.params["train.lora.rank"] == "16"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    for metric in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 12, metric
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "train.json", "train_loss.png"} <= artifacts


def test_full_fine_tuning(prepared):
    set_params(prepared, train={**FAST, "method": "full", "output_dir": "models/full", "max_steps": 3, "learning_rate": 1e-3})
    train.run(load_params(prepared))
    assert (prepared / "models" / "full" / "model.safetensors").exists()
    assert json.loads((prepared / "models" / "full" / "ftq_train.json").read_text())["method"] == "full"


def test_qlora_on_cpu_learns_through_evaluation(prepared):
    """4-bit NF4 base; evaluation mid-run must not freeze the adapter (bitsandbytes CPU repacking trap)."""
    set_params(prepared, train={**FAST, "method": "qlora", "max_steps": 8, "eval_steps": 2, "save_steps": 4,
                                "gradient_checkpointing": True})
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
    set_params(project, train={"method": "lora", "output_dir": "models/adapter", "optim": "sgd"})
    with pytest.raises(ParamsError, match="train.optim: expected one of adamw_torch, adamw_torch_fused"):
        TrainSettings.from_params(load_params(project))
    set_params(project, train={"optim": "adamw_torch", "attn_implementation": "flash_attention_2"})  # not installed here
    with pytest.raises(ParamsError, match="train.attn_implementation: flash_attention_2 needs the flash-attn package"):
        TrainSettings.from_params(load_params(project))
    set_params(project, train={"attn_implementation": "sdpa", "learning_rate_typo": 1})
    with pytest.raises(ParamsError, match="learning_rate_typo: unknown key"):
        TrainSettings.from_params(load_params(project))


def ftq_train(project, **popen):
    return subprocess.Popen([sys.executable, "-m", "ftq", "train"], cwd=project, env=project_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def test_killed_run_resumes_to_the_same_result(prepared):
    # one thread in every process: the killed run is a subprocess, and thread count changes float sums
    settings = {**FAST, "max_steps": 30, "save_steps": 5, "eval_steps": 0, "learning_rate": 1e-3, "torch_threads": 1}
    set_params(prepared, train=settings)
    uninterrupted = train.run(load_params(prepared)).report
    expected = adapter_tensors(prepared)

    proc = ftq_train(prepared)
    checkpoint = prepared / "models" / "checkpoints" / "train" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 600
    while not checkpoint.exists():
        assert proc.poll() is None, f"training ended before the checkpoint:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (prepared / "models" / "checkpoints" / "train" / "checkpoint-30").exists()

    resumed = train.run(load_params(prepared)).report
    assert resumed["resumed_from_step"] >= 10 and resumed["steps"] == 30
    statuses = sorted(r.info.status for r in mlflow_runs(prepared) if r.data.tags["ftq.stage"] == "train")
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]  # the killed run is closed, not left RUNNING
    assert resumed["final_train_loss"] == pytest.approx(uninterrupted["final_train_loss"], abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-6)
    got = adapter_tensors(prepared)
    assert got.keys() == expected.keys()
    for name in expected:
        assert (got[name] - expected[name]).abs().max().item() < 1e-6, name
    rows = (prepared / "reports" / "train_loss.csv").read_text().splitlines()
    assert len(rows) == 31  # the curve includes the steps of the killed run, from its checkpoint


def test_checkpoints_of_another_run_are_not_resumed(prepared):
    set_params(prepared, train={**FAST, "max_steps": 4, "save_steps": 2, "keep_checkpoints": True})
    train.run(load_params(prepared))
    assert (prepared / "models" / "checkpoints" / "train" / "checkpoint-4").exists()
    set_params(prepared, train={"learning_rate": 1e-3})
    report = train.run(load_params(prepared)).report
    assert report["resumed_from_step"] is None and report["steps"] == 4


def test_two_processes_on_cpu(prepared):
    set_params(prepared, train={**FAST, "max_steps": 4, "nproc_per_node": 2, "master_port": free_port(), "eval_steps": 2})
    proc = ftq_train(prepared)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "rank 0 of 2 finished" in output and "rank 1 of 2 finished" in output
    report = json.loads((prepared / "reports" / "train.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 4
    assert (prepared / "models" / "adapter" / "adapter_model.safetensors").exists()
    train_runs = [r for r in mlflow_runs(prepared) if r.data.tags["ftq.stage"] == "train"]
    assert len(train_runs) == 1 and train_runs[0].info.status == "FINISHED"
    log = [json.loads(line) for line in (prepared / ".ftq" / "runs.jsonl").read_text().splitlines()]
    assert [e["status"] for e in log if e["stage"] == "train"] == ["RUNNING", "FINISHED"]
    assert not list((prepared / "models").glob("adapter.tmp-*"))


@pytest.mark.parametrize("preset, processes", [("zero2", 2), ("zero3_offload", 2)])
def test_deepspeed_on_cpu(prepared, preset, processes):
    """DeepSpeed ZeRO through torchrun; its ops compile on first use (cached in ~/.cache/torch_extensions).
    Under ZeRO-3 the base is built partitioned across the 2 gloo ranks as it loads (the TrainingArguments
    carrying the DeepSpeed config exist before from_pretrained), never whole on each rank."""
    set_params(prepared, train={**FAST, "max_steps": 4, "eval_steps": 2, "deepspeed": preset,
                                "nproc_per_node": processes, "master_port": free_port(), "torch_threads": 1})
    proc = ftq_train(prepared)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-5000:]
    report = json.loads((prepared / "reports" / "train.json").read_text())
    assert report["steps"] == 4 and report["world_size"] == processes
    assert report["load"]["zero3_partitioned"] is (True if preset.startswith("zero3") else None)
    assert report["final_train_loss"] < report["first_train_loss"]
    assert set(adapter_tensors(prepared)) and not (prepared / "models" / "adapter" / "training_args.bin").exists()
