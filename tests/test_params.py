"""params.yaml and the code's defaults must not disagree: a value left out of params.yaml has to mean
what params.yaml says. Every block with a defaults table in code is compared key by key."""

import dataclasses

import yaml

from conftest import REPO


def _disagreements(name: str, defaults: dict, given: dict) -> list[str]:
    found = []
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            found += _disagreements(f"{name}.{key}", defaults[key], value)
        elif key in defaults and defaults[key] != value:
            found.append(f"{name}.{key}: code {defaults[key]!r}, params.yaml {value!r}")
    return found


def test_params_yaml_and_code_defaults_agree():
    from ftq.evaluation import harness
    from ftq.stages import evaluate, prepare, promote, quantize, reference
    from ftq.training.settings import TrainSettings

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tables = [
        ("data", prepare.DEFAULTS, params["data"]),
        ("train", dataclasses.asdict(TrainSettings()), params["train"]),
        ("evaluate", {k: v for k, v in evaluate.DEFAULTS.items() if k != "general"}, params["evaluate"]),
        ("evaluate.general.max_new_tokens", {"max_new_tokens": evaluate.DEFAULTS["general"]["max_new_tokens"]},
         {"max_new_tokens": params["evaluate"]["general"]["max_new_tokens"]}),
        ("evaluate.lm_eval", harness.DEFAULTS, params["evaluate"]["lm_eval"]),
        ("quantize.reference", reference.DEFAULTS, params["quantize"]["reference"]),
        ("quantize.check", quantize.CHECK_DEFAULTS, params["quantize"]["check"]),
        ("quantize.calibration", quantize.CALIBRATION_DEFAULTS, params["quantize"]["calibration"]),
        ("promote.policy", promote.DEFAULT_POLICY, params["promote"]["policy"]),
    ]
    found = [d for name, defaults, given in tables for d in _disagreements(name, defaults, given)]
    assert not found, "\n".join(found)


def test_packing_is_a_training_setting(tmp_path):
    """data.packing moved to train.packing (toggling it reruns train alone): the old key is refused by
    name, the new one validated."""
    import pytest

    from ftq.params import ParamsError
    from ftq.stages.prepare import PrepareSettings
    from ftq.training.settings import TrainSettings

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["_path"] = "params.yaml"
    assert "packing" not in params["data"] and params["train"]["packing"] is False
    with pytest.raises(ParamsError, match=r"params.yaml: data.packing: .*move it to train.packing"):
        PrepareSettings.from_params({**params, "data": {**params["data"], "packing": True}}, tmp_path)
    assert TrainSettings.from_params({**params, "train": {**params["train"], "packing": True}}).packing is True
    with pytest.raises(ParamsError, match=r"train.packing: expected true or false"):
        TrainSettings.from_params({**params, "train": {**params["train"], "packing": "yes"}})
