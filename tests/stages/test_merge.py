import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_params, make_project, mlflow_runs, set_params
from ftq.params import ParamsError
from ftq.stages import base, merge, prepare, train

FAST = {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "eval_steps": 0, "save_steps": 4,
        "warmup": 0}


def _clean_env(patch) -> None:
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
        patch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, tiny_model_dir):
    """base, prepare and a short LoRA run, once for the module; each test merges a copy of it."""
    root = make_project(tmp_path_factory.mktemp("merge") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        _clean_env(patch)
        patch.chdir(root)
        set_params(root, train=FAST)
        params = load_params(root)
        base.run(params)
        prepare.run(params)
        train.run(params)
    return root


@pytest.fixture()
def trained(trained_once, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(trained_once, root, symlinks=True)
    _clean_env(monkeypatch)
    monkeypatch.chdir(root)
    return root


def test_merge_writes_checked_folder_with_card_and_lineage(trained):
    set_params(trained, merge={"max_shard_size": "5MB"})
    report = merge.run(load_params(trained)).report
    out = trained / "models" / "merged"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == report["shards"] > 1 and (out / "model.safetensors.index.json").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "README.md"):
        assert (out / name).exists(), name
    assert report["adapter_effect_max_abs"] > 0.05 and report["dtype"] == "float32" and report["top1_agreement"] == 1.0
    assert report["merge_residual_max_abs"] <= 0.01 * report["adapter_effect_max_abs"]
    assert report["residual_ratio"] == report["merge_residual_max_abs"] / report["adapter_effect_max_abs"]
    info = json.loads((out / "ftq_merge.json").read_text())
    lineage = info["lineage"]
    assert lineage["data_md5"] and lineage["base_sha256"] and lineage["train_method"] == "lora"
    [train_run] = [r for r in mlflow_runs(trained) if r.data.tags["ftq.stage"] == "train"]
    assert lineage["train_mlflow_run_id"] == train_run.info.run_id
    card = (out / "README.md").read_text()
    assert train_run.info.run_id in card and lineage["data_md5"] in card and "differ from the unmerged base + adapter" in card
    written = json.loads((trained / "reports" / "merge.json").read_text())
    assert written.pop("provenance")["commit"] and written == report  # the file says which code made it
    # the merged weights really contain the adapter: they differ from the base
    base_weights = load_file(str(trained / "models" / "base" / "model.safetensors"))
    merged = {}
    for shard in shards:
        merged.update(load_file(str(shard)))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base_weights[name], merged[name])
    [run] = [r for r in mlflow_runs(trained) if r.data.tags["ftq.stage"] == "merge"]
    assert run.data.metrics["merge_residual_max_abs"] == report["merge_residual_max_abs"]
    assert run.data.tags["lineage.train_run_id"] == train_run.info.run_id


def test_merge_in_half_precision_uses_its_tolerance(trained):
    set_params(trained, merge={"dtype": "bfloat16"})
    report = merge.run(load_params(trained)).report
    assert report["dtype"] == "bfloat16" and report["max_residual_ratio"] == merge.DEFAULT_MAX_RESIDUAL_RATIO["bfloat16"]
    assert 0 < report["residual_ratio"] <= report["max_residual_ratio"]
    config = json.loads((trained / "models" / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_nan_adapter_fails_loudly_and_writes_nothing(trained):
    path = trained / "models" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(merge.MergeCheckError, match="NaN or Inf; nothing was written"):
        merge.run(load_params(trained))
    assert not (trained / "models" / "merged").exists()
    assert not list((trained / "models").glob("merged.tmp-*"))


def drop_adapter(monkeypatch) -> None:
    """The merge bug peers report most: the saved model is the base, the adapter unloaded instead of merged."""
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())


def scale_adapter(root, factor: float) -> None:
    path = root / "models" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, str(path))


def test_a_merge_that_drops_the_adapter_fails(trained, monkeypatch):
    drop_adapter(monkeypatch)
    with pytest.raises(merge.MergeCheckError, match=r"100 % of the adapter's effect .*allowed 1 %; nothing was written"):
        merge.run(load_params(trained))
    assert not (trained / "models" / "merged").exists()


def test_a_weak_adapter_dropped_still_fails(trained, monkeypatch):
    """An adapter that moves logits by less than the old absolute tolerance (1e-3 in float32) is still
    checked: the residual is measured against the adapter's own effect."""
    scale_adapter(trained, 1e-4)
    report = merge.run(load_params(trained)).report  # merged properly, it passes
    assert 0 < report["adapter_effect_max_abs"] < 1e-3
    drop_adapter(monkeypatch)
    with pytest.raises(merge.MergeCheckError, match="nothing was written"):
        merge.run(load_params(trained))


def test_an_adapter_that_does_nothing_fails(trained):
    scale_adapter(trained, 0.0)
    with pytest.raises(merge.MergeCheckError, match="does not change the base's logits"):
        merge.run(load_params(trained))


def test_qlora_is_checked_against_the_4bit_model_it_was_trained_as(project, monkeypatch):
    set_params(project, train={**FAST, "method": "qlora"})
    params = load_params(project)
    base.run(params)
    prepare.run(params)
    train.run(params)
    report = merge.run(load_params(project)).report
    assert report["method"] == "qlora" and report["residual_ratio"] <= 0.01
    # closer to the 4-bit model it was trained as than the base without the adapter is
    assert report["qlora_reference_residual_mean_abs"] < report["qlora_dropped_adapter_mean_abs"]
    shutil.rmtree(project / "models" / "merged")
    drop_adapter(monkeypatch)
    with pytest.raises(merge.MergeCheckError, match="nothing was written"):
        merge.run(load_params(project))


def test_full_fine_tune_is_packaged_the_same_way(project):
    set_params(project, train={**FAST, "method": "full", "output_dir": "models/full", "max_steps": 2, "learning_rate": 1e-3})
    params = load_params(project)
    base.run(params)
    prepare.run(params)
    train.run(params)
    report = merge.run(load_params(project)).report
    # the baseline is the base model: training moved its logits, and the saved folder reproduces the trained model
    assert report["method"] == "full" and report["adapter_effect_max_abs"] > 0.05
    assert report["merge_residual_max_abs"] <= 0.01 * report["adapter_effect_max_abs"]
    assert json.loads((project / "models" / "merged" / "ftq_merge.json").read_text())["lineage"]["train_method"] == "full"


def test_merge_settings_are_validated(project):
    set_params(project, merge={"dtype": "int8"})
    with pytest.raises(ParamsError, match=r"params.yaml: merge.dtype: expected one of auto, float32, bfloat16, float16, got 'int8'"):
        merge.MergeSettings.from_params(load_params(project))
    set_params(project, merge={"dtype": "auto", "check": {"max_residual_ratio": 1.5}})
    with pytest.raises(ParamsError, match=r"merge.check.max_residual_ratio: expected auto or a number between 0 and 1, got 1.5"):
        merge.MergeSettings.from_params(load_params(project))
    set_params(project, merge={"dtype": "auto", "shards": 3})
    with pytest.raises(ParamsError, match=r"merge.shards: unknown key \(did you mean max_shard_size\?\)"):
        merge.MergeSettings.from_params(load_params(project))


GIB = 1 << 30


def test_merge_device_map_fits_one_gpu_or_offloads_the_rest():
    assert merge.merge_device_map(10 * GIB, None) == {"device_map": {"": "cpu"}}  # no GPU
    assert merge.merge_device_map(10 * GIB, 20 * GIB, gpu=1) == {"device_map": {"": 1}}
    # 30 GiB of weights, 20 GiB free on the GPU, 64 GiB of RAM: as much as fits on that GPU, the rest in RAM
    spec = merge.merge_device_map(30 * GIB, 20 * GIB, gpu=0, free_cpu_bytes=64 * GIB)
    assert spec["device_map"] == "auto" and set(spec["max_memory"]) == {0, "cpu"}
    assert spec["max_memory"][0] < 20 * GIB and spec["max_memory"]["cpu"] >= 30 * GIB
    # the check's activations count: weights that would just fit do not once they are reserved
    assert merge.merge_device_map(17 * GIB, 20 * GIB, reserve_bytes=2 * GIB)["device_map"] == "auto"


def test_weights_are_counted_from_the_safetensors_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stored = {name for name in model.state_dict() if name != "lm_head.weight"}  # tied to the embeddings
    assert merge.weights_numel(tiny_model_dir) == sum(model.state_dict()[n].numel() for n in stored)


@pytest.fixture()
def one_gpu_with(monkeypatch):
    """A (mocked) GPU 0 with `free` bytes free; torch's allocator holds nothing."""
    def with_free(free: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    return with_free


def test_a_model_larger_than_the_gpu_is_placed_with_cpu_offload(tiny_model_dir, one_gpu_with):
    """The tiny model (about a MiB in float32) on a GPU with room for it, then on one with a few hundred KiB."""
    one_gpu_with(8 * GIB)
    assert merge.placement("float32", tiny_model_dir)["device_map"] == {"": 0}
    one_gpu_with(300 << 10)
    kwargs = merge.placement("float32", tiny_model_dir)
    assert kwargs["device_map"] == "auto" and kwargs["dtype"] == torch.float32
    assert 0 < kwargs["max_memory"][0] < 300 << 10 and kwargs["max_memory"]["cpu"] > 0
    assert merge.offloaded(kwargs)

