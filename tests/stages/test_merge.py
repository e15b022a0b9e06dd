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
    assert report["max_abs_logit_diff"] <= 1e-3 and report["top1_agreement"] == 1.0 and report["dtype"] == "float32"
    info = json.loads((out / "ftq_merge.json").read_text())
    lineage = info["lineage"]
    assert lineage["data_md5"] and lineage["base_sha256"] and lineage["train_method"] == "lora"
    [train_run] = [r for r in mlflow_runs(trained) if r.data.tags["ftq.stage"] == "train"]
    assert lineage["train_mlflow_run_id"] == train_run.info.run_id
    card = (out / "README.md").read_text()
    assert train_run.info.run_id in card and lineage["data_md5"] in card and "max |diff|" in card
    assert json.loads((trained / "reports" / "merge.json").read_text()) == report
    # the merged weights really contain the adapter: they differ from the base
    base_weights = load_file(str(trained / "models" / "base" / "model.safetensors"))
    merged = {}
    for shard in shards:
        merged.update(load_file(str(shard)))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base_weights[name], merged[name])
    [run] = [r for r in mlflow_runs(trained) if r.data.tags["ftq.stage"] == "merge"]
    assert run.data.metrics["max_abs_logit_diff"] == report["max_abs_logit_diff"]
    assert run.data.tags["lineage.train_run_id"] == train_run.info.run_id


def test_merge_in_half_precision_uses_its_tolerance(trained):
    set_params(trained, merge={"dtype": "bfloat16"})
    report = merge.run(load_params(trained)).report
    assert report["dtype"] == "bfloat16" and report["atol"] == 0.25
    config = json.loads((trained / "models" / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_nan_adapter_fails_loudly_and_writes_nothing(trained):
    path = trained / "models" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(merge.MergeCheckError, match="nothing was written"):
        merge.run(load_params(trained))
    assert not (trained / "models" / "merged").exists()
    assert not list((trained / "models").glob("merged.tmp-*"))


def test_full_fine_tune_is_packaged_the_same_way(project):
    set_params(project, train={**FAST, "method": "full", "output_dir": "models/full", "max_steps": 2, "learning_rate": 1e-3})
    params = load_params(project)
    base.run(params)
    prepare.run(params)
    train.run(params)
    report = merge.run(load_params(project)).report
    assert report["method"] == "full" and report["max_abs_logit_diff"] == 0.0
    assert json.loads((project / "models" / "merged" / "ftq_merge.json").read_text())["lineage"]["train_method"] == "full"


def test_merge_settings_are_validated(project):
    set_params(project, merge={"dtype": "int8"})
    with pytest.raises(ParamsError, match="merge.dtype 'int8'"):
        merge.MergeSettings.from_params(load_params(project))
    set_params(project, merge={"dtype": "auto", "shards": 3})
    with pytest.raises(ParamsError, match="unknown keys"):
        merge.MergeSettings.from_params(load_params(project))
