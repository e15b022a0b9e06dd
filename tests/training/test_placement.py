"""Where each rank's weights go, checked on CPU: CUDA is mocked (it is absent here), the collectives are
recorded. The ZeRO-3 partitioned load runs for real on 2 gloo ranks in tests/stages/test_train.py."""

import pytest
import torch
import torch.distributed as dist

from ftq.training import launch
from ftq.hf import cpu_multiplies_bf16
from ftq.training.model import load_kwargs, precision_flags
from ftq.training.settings import TrainSettings


@pytest.fixture()
def rank_one_of_two(monkeypatch):
    """This process as torchrun's rank 1 of 2 on a machine with (mocked) GPUs; calls are recorded."""
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
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
