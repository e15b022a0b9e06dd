"""Where each rank's weights go, checked on CPU: CUDA is mocked (it is absent here), the collectives are
recorded. The ZeRO-3 partitioned load runs for real on 2 gloo ranks in tests/stages/test_train.py."""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from ftq.training import launch
from ftq.hf import cpu_multiplies_bf16
from ftq.training.model import load_kwargs, parameter_counts, precision_flags
from ftq.training.settings import TrainSettings


@pytest.fixture()
def rank_one_of_two(monkeypatch):
    """This process as torchrun's rank 1 of 2 on a machine with (mocked) GPUs; calls are recorded."""
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init" for c in calls))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **_: calls.append(("init", backend)))
    return calls


def test_rank_pins_its_gpu_before_joining_the_group(rank_one_of_two):
    device = launch.start_worker()
    assert str(device) == "cuda:1"
    assert rank_one_of_two == [("set_device", "cuda:1"), ("init", "nccl")]


def test_cpu_ranks_use_gloo_and_pin_nothing(monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append("set_device"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **_: calls.append(backend))
    assert str(launch.start_worker()) == "cpu" and calls == ["gloo"]


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_every_method_loads_on_the_ranks_gpu(rank_one_of_two, method, tmp_path):
    settings = TrainSettings.defaults(method=method, output_dir="models/full" if method == "full" else "models/adapter")
    kwargs = load_kwargs(settings, {"bf16": True, "fp16": False}, launch.local_device(), tmp_path)
    assert kwargs["device_map"] == {"": 1}  # cuda:1, not current_device() (cuda:0 before set_device)
    assert kwargs["dtype"] == (torch.float32 if method == "full" else torch.bfloat16)
    assert kwargs["attn_implementation"] == "sdpa" and kwargs["trust_remote_code"] is False


def test_deepspeed_places_weights_itself(rank_one_of_two, tmp_path):
    """No device_map under DeepSpeed: ZeRO-3's partitioned init decides where every shard lives."""
    settings = TrainSettings.defaults(deepspeed="zero3")
    assert "device_map" not in load_kwargs(settings, {"bf16": True, "fp16": False}, launch.local_device(), tmp_path)


def test_trust_remote_code_follows_the_base_stage(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "base.json").write_text('{"trust_remote_code": true}')
    kwargs = load_kwargs(TrainSettings.defaults(), {"bf16": False, "fp16": False}, torch.device("cpu"), tmp_path)
    assert kwargs["trust_remote_code"] is True and "device_map" not in kwargs


def test_cpu_precision_follows_the_base_and_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_flags("auto", "bfloat16", cpu_bf16=False) == {"bf16": True, "fp16": False}  # not doubled
    assert precision_flags("auto", "float32", cpu_bf16=False) == {"bf16": False, "fp16": False}  # AVX2: emulated
    assert precision_flags("auto", "float32", cpu_bf16=True) == {"bf16": True, "fp16": False}
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        precision_flags("fp16")


def test_bf16_matrix_instructions_are_read_from_cpuinfo():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert not cpu_multiplies_bf16(avx2)
    assert cpu_multiplies_bf16(avx2.replace("fma", "fma avx512f avx512_bf16"))
    assert cpu_multiplies_bf16(avx2.replace("fma", "fma amx_bf16 amx_tile"))
    assert not cpu_multiplies_bf16(avx2.replace("fma", "fma avx512f avx512bw"))  # AVX-512 alone emulates bf16


def test_older_gpus_train_in_fp16_not_emulated_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision_flags("auto") == {"bf16": False, "fp16": True}  # a T4 says True only with emulation


@pytest.mark.parametrize("major, expected", [(7, {"bf16": False, "fp16": True}), (8, {"bf16": True, "fp16": False})])
def test_auto_precision_follows_the_compute_capability(monkeypatch, major, expected):
    """torch's own is_bf16_supported, with only the hardware answers mocked: a V100/T4 (7.x) can make bf16
    tensors (emulated, several times slower) and must train in fp16; Ampere and later (8.x+) in bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert precision_flags("auto") == expected


def test_gpu_index_of_a_rank():
    assert [launch.gpu_index(rank, 4) for rank in range(4)] == [0, 1, 2, 3]  # torchrun: each rank sees all
    assert launch.gpu_index(3, 1) == 0  # a scheduler's one GPU per rank (CUDA_VISIBLE_DEVICES=<its GPU>)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 2, but this process sees 2 GPU"):
        launch.gpu_index(2, 2)  # two ranks on one GPU: NCCL would refuse, obscurely


def test_rank_of_a_scheduler_that_shows_it_one_gpu(rank_one_of_two, monkeypatch):
    """LOCAL_RANK 1 with one visible GPU: cuda:1 does not exist, the rank's GPU is cuda:0."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert str(launch.start_worker()) == "cuda:0"
    assert rank_one_of_two == [("set_device", "cuda:0"), ("init", "nccl")]


@pytest.fixture()
def one_process_four_gpus(monkeypatch):
    """Not under torchrun, on a host with 4 (mocked) GPUs."""
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    import transformers  # noqa: F401  (imported before CUDA is mocked: bitsandbytes probes it on import)
    from transformers import TrainingArguments  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def test_one_process_on_a_multi_gpu_host_trains_on_one_gpu(one_process_four_gpus, tmp_path):
    """transformers' own TrainingArguments: unchanged, n_gpu would be 4, and the Trainer would wrap the model in
    nn.DataParallel with a batch of 4 x per_device_batch_size."""
    from ftq.stages.train import training_arguments

    settings = TrainSettings.defaults(per_device_batch_size=3)
    args = training_arguments(settings, tmp_path, {"bf16": False, "fp16": False}, packing=False, has_eval=False)
    assert str(args.device) == "cuda:0" and args.n_gpu == 1 and args.train_batch_size == 3
    assert str(launch.local_device()) == "cuda:0"  # where load_for_training puts the weights


def test_preference_tuning_on_a_multi_gpu_host_trains_on_one_gpu(one_process_four_gpus, tmp_path):
    from ftq.training.preference import trainer_and_config

    common = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "use_cpu": False, "report_to": "none",
              "bf16": False, "fp16": False}
    cfg = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "max_length": 64}
    _, args = trainer_and_config("dpo", cfg, common)
    assert args.n_gpu == 1 and args.train_batch_size == 2


ZERO3_COUNT = """
import os, json, torch, torch.distributed as dist
import deepspeed
from ftq.training.model import parameter_counts
dist.init_process_group("gloo", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2, bias=False))
model[1].weight.requires_grad_(False)
print(json.dumps({"numel": sum(p.numel() for p in model.parameters()), "counts": parameter_counts(model)}))
"""


def test_parameter_counts_under_zero3_are_the_full_sizes(tmp_path):
    """A real ZeRO-3 partitioned init (DeepSpeed, one gloo rank, in a child process): each parameter is an
    empty placeholder, so counting numel gives 0; the counts are the model's full sizes."""
    from ftq.processes import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(ZERO3_COUNT)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["numel"] == 0  # what the old count logged as total_parameters
    assert result["counts"] == [8 * 4 + 4, 8 * 4 + 4 + 4 * 2]
