"""The GPU path (make test-gpu): each test skips with its reason where CUDA (or a second GPU, or a CUDA
build of llama.cpp) is absent. Every stage runs on the tiny model with a bf16 base, as a GPU user runs it."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import load_params, project_env, set_params
from ftq.stages import base, merge, prepare, quantize, reference, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (make test-gpu needs one)"),
]
FAST = {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "eval_steps": 2, "save_steps": 4,
        "warmup": 0}


@pytest.fixture()
def gpu_project(project):
    root = project
    set_params(root, base={"dtype": "bfloat16"}, train=FAST,
               quantize={"check": {"max_new_tokens": 12}, "reference": {"examples": 6, "max_length": 128},
                         "calibration": {"split": "train", "samples": 8, "max_length": 128, "seed": 0}})
    params = load_params(root)
    base.run(params)
    prepare.run(params)
    return root


def train_report(root):
    return json.loads((root / "reports" / "train.json").read_text())


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_training_runs_on_the_gpu_in_bf16(gpu_project, method):
    set_params(gpu_project, train={"method": method, "precision": "bf16",
                                   "output_dir": "models/full" if method == "full" else "models/adapter"})
    report = train.run(load_params(gpu_project)).report
    assert report["load"]["device"] == "cuda:0" and report["peak_cuda_bytes"] > 0
    assert report["peak_memory_bytes"] == report["peak_cuda_bytes"]  # the device the work ran on
    assert report["final_train_loss"] < report["first_train_loss"]


def test_merge_in_bf16_on_the_gpu(gpu_project):
    """Training ran first in this process: the merge resets CUDA's peak, so its own peak and the device
    merge_and_unload ran on are what the report shows (a merge on the CPU reports cpu and no CUDA peak)."""
    set_params(gpu_project, train={"precision": "bf16"})
    params = load_params(gpu_project)
    train.run(params)
    torch.cuda.reset_peak_memory_stats()
    report = merge.run(params).report
    assert report["device"] == "cuda:0" and report["dtype"] == "bfloat16"
    merged_bytes = report["num_parameters"] * 2  # bf16: the merged weights were on the GPU at once
    assert report["peak_cuda_bytes"] >= merged_bytes and report["peak_memory_bytes"] == report["peak_cuda_bytes"]
    assert report["residual_ratio"] <= report["max_residual_ratio"]


def run_train(root, **train_params):
    set_params(root, train=train_params)
    return subprocess.run([sys.executable, "-m", "ftq", "train"], cwd=root, env=project_env(root),
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over 2 processes needs 2 GPUs")
def test_ddp_on_two_gpus(gpu_project):
    done = run_train(gpu_project, nproc_per_node=2, master_port=29561)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert train_report(gpu_project)["world_size"] == 2


def test_deepspeed_zero3_one_process_loads_partitioned(gpu_project):
    done = run_train(gpu_project, deepspeed="zero3", master_port=29562)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert train_report(gpu_project)["load"]["zero3_partitioned"] is True


@pytest.mark.parametrize("build", [{"method": "awq", "bits": 4, "group_size": 32},
                                   {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}])
def test_awq_and_gptq_build_on_cuda(gpu_project, build):
    params = load_params(gpu_project)
    for stage in (train, merge, reference):
        stage.run(params)
    params["quantize"]["builds"]["gpu_build"] = build
    torch.cuda.reset_peak_memory_stats()
    manifest = quantize.run(params, "gpu_build").manifest
    assert manifest["check"]["passed"]
    # calibration ran on the GPU: the build's own CUDA peak (reset before it) holds at least the model's
    # weights; a CPU calibration leaves it 0
    merged_bytes = json.loads((gpu_project / "reports" / "merge.json").read_text())["size_bytes"]
    assert manifest["backend"]["build_cuda_peak_bytes"] >= merged_bytes / 2


def test_gguf_runs_with_every_layer_on_the_gpu(gpu_project, capfd):
    """llama.cpp's own load log says how many layers it put on the GPU: all of them, for the build the
    check passed (a CPU build, or a GPU build that offloads nothing, prints fewer or none)."""
    import re

    from ftq.runtimes import gpu_layers
    from ftq.runtimes.llamacpp import LlamaCppRuntime

    if gpu_layers() >= 0:
        pytest.skip("llama-cpp-python here is a CPU build (make install builds it with CUDA where nvcc is present)")
    params = load_params(gpu_project)
    for stage in (train, merge, reference):
        stage.run(params)
    manifest = quantize.run(params, "q8_0").manifest
    assert manifest["check"]["passed"] and manifest["check"]["top1_agreement"] > 0.9
    capfd.readouterr()
    runtime = LlamaCppRuntime(gpu_project / "models" / "quantized" / "q8_0" / "model.gguf", verbose=True)
    runtime.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    runtime.close()
    log = capfd.readouterr().err
    offloaded = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    assert offloaded, log[-3000:]
    assert offloaded.group(1) == offloaded.group(2)
