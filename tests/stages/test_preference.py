"""Stage preference: DPO, ORPO, SimPO and KTO after SFT on the tiny model, through merge and `dvc repro`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from conftest import load_params, mlflow_runs, project_env, run, set_params
from ftq.data.errors import DataError
from ftq.params import ParamsError
from ftq.stages import base, merge, prepare, preference, train

SFT = {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "eval_steps": 0, "save_steps": 4,
       "logging_steps": 1, "warmup": 0}
TUNE = {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "warmup": 0, "eval_examples": 12,
        "save_steps": 2}


@pytest.fixture()
def trained(project):
    set_params(project, train=SFT)
    params = load_params(project)
    base.run(params)
    prepare.run(params)
    train.run(params)
    return project


def test_objective_none_passes_train_output_to_merge(project):
    result = preference.run(load_params(project))
    assert result.report == {"objective": "none"}
    assert json.loads((project / "models/preference/ftq_preference.json").read_text()) == {"objective": "none"}
    (project / "models/adapter").mkdir(parents=True)
    (project / "models/adapter/adapter_config.json").write_text("{}")
    assert merge.trained_output(load_params(project), project) == ("lora", project / "models/adapter")


def test_supervised_data_and_mismatched_objectives_are_refused(project):
    set_params(project, preference={"objective": "dpo", "datasets": ["ftq_default"]})
    with pytest.raises(ParamsError, match="'ftq_default' holds supervised conversations"):
        preference.run(load_params(project))
    registry = yaml.safe_load((project / "data/datasets.yaml").read_text())
    registry["kto_demo"] = {"file": "raw/kto.json", "format": "sharegpt", "columns": {"messages": "messages",
                                                                                     "kto_tag": "label"}}
    (project / "data/datasets.yaml").write_text(yaml.safe_dump(registry))
    (project / "data/raw/kto.json").write_text(json.dumps([{"messages": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "label": True}]))
    set_params(project, preference={"objective": "orpo", "datasets": ["kto_demo"]})
    with pytest.raises(ParamsError, match="KTO's labelled single answers; preference.objective orpo trains on pairs"):
        preference.run(load_params(project))
    set_params(project, preference={"objective": "kto", "loss_type": "ipo", "datasets": ["kto_demo"]})
    with pytest.raises(ParamsError, match="preference.loss_type: ipo is a DPO loss"):
        preference.run(load_params(project))
    set_params(project, preference={"objective": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})
    with pytest.raises(ParamsError, match=r"preference.loss_weights: 1 weight\(s\) for 2 loss_type\(s\)"):
        preference.run(load_params(project))
    set_params(project, preference={"objective": "dpo", "loss_type": ["sigmoid", "dpop"]})
    with pytest.raises(ParamsError, match="preference.loss_type: expected one of sigmoid, .* or a list of them"):
        preference.run(load_params(project))


def test_a_bad_pair_names_file_record_and_field(project):
    pairs = json.loads((project / "data/raw/ftq_default/preference.json").read_text())
    pairs[3]["rejected"] = pairs[3]["chosen"]
    pairs[5]["chosen"] = ""
    (project / "data/raw/ftq_default/preference.json").write_text(json.dumps(pairs))
    set_params(project, preference={"objective": "dpo"})
    with pytest.raises(DataError) as error:
        preference.run(load_params(project))
    message = str(error.value)
    assert "2 bad preference record(s)" in message
    assert "preference.json: record 3: field 'rejected': the same answer as 'chosen'" in message
    assert "record 5: field 'chosen': empty" in message
    assert not (project / "models/preference").exists()  # nothing produced


def small_pair_set(root, n: int = 16) -> str:
    """ftq_default_pairs cut to n pairs (LLaMA-Factory's num_samples), registered as `pairs_small`."""
    registry = yaml.safe_load((root / "data/datasets.yaml").read_text())
    registry["pairs_small"] = {**registry["ftq_default_pairs"], "num_samples": n}
    (root / "data/datasets.yaml").write_text(yaml.safe_dump(registry))
    return "pairs_small"


def test_dpo_after_sft_learns_the_pairs_it_is_scored_on_and_merges(trained):
    # the tiny model is random: what generalises is SmolLM2's business (bench/preference.py); here the
    # pairs trained on are the pairs scored, so a working DPO and a working measurement must both show it
    pairs = small_pair_set(trained)
    set_params(trained, preference={**TUNE, "objective": "dpo", "max_steps": 8, "datasets": [pairs],
                                    "eval_datasets": [pairs], "eval_examples": 0, "beta": 0.5})
    result = preference.run(load_params(trained))
    report = json.loads((trained / "reports/preference.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["objective"] == "dpo" and report["start_from"] == "sft" and report["steps"] == 8
    held = report["held_out"]
    assert held["pairs"] == 16 and held["reward_margin"]["interval"][0] > 0
    assert held["pref_accuracy_vs_reference"]["interval"][0] > 0  # above the starting model's 0.5
    out = trained / "models/preference"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "ftq_preference.json",
                 "reference_logps.jsonl"):
        assert (out / name).exists(), name
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert not any(".ref." in k for k in tensors)  # TRL's frozen reference copy is not saved
    sft = load_file(str(trained / "models/adapter/adapter_model.safetensors"))
    assert tensors.keys() == sft.keys() and any((tensors[k] - sft[k]).abs().max() > 0 for k in sft)
    rows = (trained / "reports/preference_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and "rewards/margins" in rows[0] and len(rows) == 9
    assert len((trained / "reports/preference.pairs.jsonl").read_text().splitlines()) == 16
    [tuned] = [r for r in mlflow_runs(trained) if r.data.tags["ftq.stage"] == "preference"]
    assert tuned.data.params["preference.objective"] == "dpo"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    for metric in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert len(client.get_metric_history(tuned.info.run_id, metric)) == 8, metric
    assert "heldout_pref_accuracy" in tuned.data.metrics
    assert merge.trained_output(load_params(trained), trained)[1] == out
    merge.run(load_params(trained))
    lineage = json.loads((trained / "models/merged/ftq_merge.json").read_text())["lineage"]
    assert lineage["preference_objective"] == "dpo" and lineage["preference_mlflow_run_id"] == tuned.info.run_id


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_dpo_straight_on_the_base_with_each_method(project, method):
    """start_from base: a new adapter whose disabled self is the reference (LoRA, QLoRA), or the whole
    model against a frozen copy (full); no SFT output is read."""
    base.run(load_params(project))
    set_params(project, train={"method": method, "output_dir": "models/full" if method == "full" else "models/adapter"},
               preference={**TUNE, "objective": "dpo", "start_from": "base", "max_steps": 2, "eval_examples": 4})
    report = preference.run(load_params(project)).report
    assert report["method"] == method and report["steps"] == 2 and report["held_out"]["pairs"] == 4
    out = project / "models/preference"
    assert (out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).exists()
    assert not (project / "models/adapter").exists() and not (project / "models/full").exists()
    assert merge.trained_output(load_params(project), project) == (method, out)


def test_killed_run_resumes_to_the_same_adapter(trained):
    settings = {**TUNE, "objective": "dpo", "max_steps": 8, "save_steps": 2, "learning_rate": 1e-3}
    set_params(trained, preference=settings, train={**SFT, "torch_threads": 1})
    uninterrupted = preference.run(load_params(trained)).report
    expected = load_file(str(trained / "models/preference/adapter_model.safetensors"))
    proc = subprocess.Popen([sys.executable, "-m", "ftq", "preference"], cwd=trained, env={
        **project_env(trained), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    checkpoint = trained / "models/checkpoints/preference/checkpoint-4/trainer_state.json"
    deadline = time.time() + 600
    while not checkpoint.exists():
        assert proc.poll() is None, f"ended before the checkpoint:\n{proc.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = preference.run(load_params(trained)).report
    assert resumed["resumed_from_step"] >= 4 and resumed["steps"] == 8
    assert resumed["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-5)
    assert resumed["held_out"]["pref_accuracy"] == uninterrupted["held_out"]["pref_accuracy"]
    # the resumed steps trained against the SFT adapter, not against the checkpoint's own weights
    curve = (trained / "reports/preference_log.csv").read_text().splitlines()
    assert curve[5].split(",")[6] != "0.0"  # step 5's reward margin
    got = load_file(str(trained / "models/preference/adapter_model.safetensors"))
    for name in expected:
        assert (got[name] - expected[name]).abs().max().item() < 1e-5, name
    assert len((trained / "reports/preference_log.csv").read_text().splitlines()) == 9


def test_dvc_repro_runs_sft_then_each_objective_and_preference_changes_rerun_only_preference(project):
    set_params(project, train=SFT, preference={**TUNE, "objective": "dpo", "max_steps": 2, "eval_examples": 4})
    env = project_env(project)
    run([sys.executable, "-m", "dvc", "repro", "merge"], project, env)
    report = json.loads((project / "reports/preference.json").read_text())
    assert report["objective"] == "dpo" and report["steps"] == 2
    assert json.loads((project / "reports/merge.json").read_text())["method"] == "lora"
    # each objective is a preference change: train is skipped; the first (ORPO) is repro'd through merge,
    # which reruns after it (one DPO rerun on a changed beta showed the same and cost a stage process)
    for objective, settings, target in (("orpo", {"beta": 0.2}, "merge"), ("simpo", {"beta": 2.0}, "preference"),
                                        ("kto", {}, "preference")):
        set_params(project, preference={"objective": objective, **settings})
        log = run([sys.executable, "-m", "dvc", "repro", target], project, env).stdout
        assert "Stage 'train' didn't change, skipping" in log and "Running stage 'preference'" in log
        if target == "merge":
            assert "Running stage 'merge'" in log
        report = json.loads((project / "reports/preference.json").read_text())
        assert report["objective"] == objective and report["steps"] == 2 and report["held_out"]["pairs"] == 4
        curve = (project / "reports/preference_log.csv").read_text().splitlines()
        assert len(curve) == 3 and all(row.split(",")[1] for row in curve[1:])
        if objective == "kto":
            assert report["train_records"] == 2 * 240  # each pair: a desirable and an undesirable answer
