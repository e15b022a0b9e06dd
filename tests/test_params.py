"""params.yaml against ftq.schema, the one place each setting's default, accepted values and help are
defined: params.yaml states every default again for its reader, with the help as its comment, and must
not disagree with the schema; every stage validates its block through schema.settings."""

import re

import pytest
import yaml

from conftest import REPO
from ftq import schema
from ftq.params import ParamsError, flatten


def _repo_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["_path"] = "params.yaml"
    return params


def test_params_yaml_states_every_setting_with_the_schemas_default():
    params = _repo_params()
    optional = {"evaluate.mt_bench", "evaluate.lm_eval.choices", "evaluate.lm_eval.seed"}  # advanced: left out
    found = []
    for name in schema.SCHEMA:
        defaults = flatten(schema.defaults(name), f"{name}.", lists_as_json=False)
        given = flatten(params[name], f"{name}.", lists_as_json=False)
        for key, value in defaults.items():
            if key == "data.datasets" or key.startswith("quantize.builds") or key == "evaluate.general.questions":
                continue  # the project's choices, not defaults
            if key not in given:
                if not any(key == o or key.startswith(o + ".") for o in optional):
                    found.append(f"{key}: not in params.yaml")
            elif given[key] != value and key != "quantize.enabled":
                found.append(f"{key}: schema {value!r}, params.yaml {given[key]!r}")
    assert not found, "\n".join(found)


def comments(text: str) -> dict[str, str]:
    """{dotted key: its comment} for every key of a YAML file: the text after ` #` on the key's line, and
    the comment-only lines right below it indented deeper than the key (the comment wrapped), joined."""
    found, path, last = {}, [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped.startswith("#") and last and indent > last[1]:
            found[last[0]] = f"{found[last[0]]} {stripped[1:].strip()}".strip()
            continue
        key = re.match(r"([\w.\-]+):", stripped)
        if not key:  # a comment line of its own, a list item, a blank line
            last = None
            continue
        path = [(i, k) for i, k in path if i < indent] + [(indent, key[1])]
        dotted = ".".join(k for _, k in path)
        found[dotted] = line.partition(" #")[2].strip()
        last = (dotted, indent)
    return found


def test_every_setting_says_what_it_does_and_names_each_value_it_accepts():
    """Its help is what `ftq params --explain` and params.yaml's comment on it say; a setting with a few
    accepted values names each (the comment may not list fewer than the code accepts)."""
    assert [key for key, setting in schema.leaves() if not setting.help] == []
    unnamed = [f"{key}: {option}" for key, setting in schema.leaves() for option in setting.options
               if not re.search(rf"(?<![\w.-]){re.escape(str(option))}(?![\w-])", setting.explained())]
    assert unnamed == []


def test_params_yaml_comments_are_the_schemas_help():
    """The comment on each setting in params.yaml is the schema's help for it, word for word: change
    one, change the other (the help may write {choices} for the accepted values)."""
    found = []
    for key, comment in comments((REPO / "params.yaml").read_text()).items():
        setting = schema.find(key)
        if setting is not None and comment != setting.explained():
            found.append(f"{key}:\n  params.yaml: {comment!r}\n  schema:      {setting.explained()!r}")
    assert not found, "\n".join(found)


def test_comments_joins_a_wrapped_comment_and_leaves_the_next_keys_preamble():
    text = ("a:\n  b: 1  # one\n        # two\n  # about c\n  c: [x]\n  d:   # block\n    e: 2\n")
    assert comments(text) == {"a": "", "a.b": "one two", "a.c": "", "a.d": "block", "a.d.e": ""}
    assert schema.find("evaluate.lm_eval.local_data.hellaswag.seed") is schema.LOCAL_TASK["seed"]
    assert schema.find("quantize.builds.q8_0") is None and schema.find("quantize.check") is None


def test_every_block_of_params_yaml_passes_the_validator_unchanged():
    params = _repo_params()
    for name in schema.SCHEMA:
        values = schema.settings(params, name)
        assert flatten(params[name], lists_as_json=False).items() <= flatten(values, lists_as_json=False).items()


@pytest.mark.parametrize("block, change, message", [
    ("train", {"learnig_rate": 1e-3}, r"params.yaml: train.learnig_rate: unknown key \(did you mean learning_rate\?\)"),
    ("train", {"per_device_batch_size": "8"}, r"train.per_device_batch_size: expected an integer >= 1, got '8'"),
    ("train", {"lora": {"dropout": 1.0}}, r"train.lora.dropout: expected a number >= 0 and < 1, got 1.0"),
    ("evaluate", {"lm_eval": {"limit": -1}}, r"evaluate.lm_eval.limit: expected an integer >= 0, got -1"),
    ("quantize", {"check": {"max_kld_man": 0.1}}, r"quantize.check.max_kld_man: unknown key \(did you mean max_kld_mean\?\)"),
    ("promote", {"policy": {"confidence": 95}}, r"promote.policy.confidence: expected a number >= 0.5 and < 1, got 95"),
    ("data", {"packing": True}, r"data.packing: packing is a training setting now: move it to train.packing"),
    ("data", {"truncation": "left"}, r"data.truncation: expected one of right, drop, got 'left'"),
    ("base", {"dtype": "fp16"}, r"base.dtype: expected one of auto, float32, bfloat16, float16, got 'fp16'"),
    ("tracking", {"experimnt": "x"}, r"tracking.experimnt: unknown key \(did you mean experiment\?\)"),
])
def test_the_validator_names_the_file_and_the_setting(block, change, message):
    params = _repo_params()
    for key, value in change.items():
        params[block][key] = {**params[block][key], **value} if isinstance(value, dict) else value
    with pytest.raises(ParamsError, match=message):
        schema.settings(params, block)


def test_left_out_settings_take_the_schemas_default_and_a_build_overrides_only_what_it_names():
    from ftq.stages.quantize import build_spec
    from ftq.training.settings import TrainSettings

    params = _repo_params()
    del params["train"]["learning_rate"], params["train"]["lora"]
    settings = TrainSettings.from_params(params)
    assert settings.learning_rate == 5e-4 and settings.lora.rank == 16
    assert schema.settings({**params, "data": {**params["data"], "datasets": "ftq_default"}}, "data")["datasets"] \
        == ["ftq_default"]  # a single name is stored as the one-item list every reader expects
    params["quantize"]["check"]["max_kld_mean"] = 0.2
    params["quantize"]["builds"]["q8_0"]["check"] = {"max_kld_p99": 0.9}
    spec = build_spec(params, "q8_0")
    assert spec.check["max_kld_mean"] == 0.2 and spec.check["max_kld_p99"] == 0.9
    assert spec.check["min_top1_agreement"] == 0.90 and spec.calibration == schema.defaults("quantize")["calibration"]
    params["quantize"]["builds"]["q8_0"]["check"] = {"max_kld": 0.9}
    with pytest.raises(ParamsError, match=r"quantize.builds.q8_0.check.max_kld: unknown key"):
        build_spec(params, "q8_0")


def test_packing_is_a_training_setting(tmp_path):
    """data.packing moved to train.packing (toggling it reruns train alone): the old key is refused by
    name, the new one validated."""
    from ftq.stages.prepare import PrepareSettings
    from ftq.training.settings import TrainSettings

    params = _repo_params()
    assert "packing" not in params["data"] and params["train"]["packing"] is False
    with pytest.raises(ParamsError, match=r"params.yaml: data.packing: .*move it to train.packing"):
        PrepareSettings.from_params({**params, "data": {**params["data"], "packing": True}}, tmp_path)
    assert TrainSettings.from_params({**params, "train": {**params["train"], "packing": True}}).packing is True
    with pytest.raises(ParamsError, match=r"train.packing: expected true or false"):
        TrainSettings.from_params({**params, "train": {**params["train"], "packing": "yes"}})
