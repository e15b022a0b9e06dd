"""params.yaml's schema: every setting of every block, its default and what it accepts, defined once.

`settings(params, "train")` is the one validator every stage calls: it refuses unknown keys (naming the
closest known one), checks each value's type, choices and range, and fills what params.yaml leaves out
with the default here. An error names the file and the dotted key. Rules that tie settings together
(a build's options, train.output_dir vs train.method) stay with the code that knows them.
params.yaml states every default again for the reader; tests/test_params.py holds the two equal."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from ftq.data.tokenize import TRUNCATION
from ftq.evaluation.local_data import FORMATS as LOCAL_FORMATS
from ftq.params import ParamsError


@dataclass(frozen=True)
class Setting:
    default: Any
    accepts: Callable[[Any], bool]
    expect: str  # what a valid value is, for the error message
    required: bool = False  # no default: params.yaml must give it
    normalize: Callable[[Any], Any] | None = None  # the accepted value in its one stored form


@dataclass(frozen=True)
class Entries:
    """A mapping of names the user chooses (e.g. lm-eval task names) to blocks of one schema, each
    validated and completed like a block of its own (errors name `<where>.<name>.<key>`)."""
    entry: dict
    default: dict


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def Int(default, minimum=None, nullable=False) -> Setting:
    def accepts(v):
        return (nullable and v is None) or (_integer(v) and (minimum is None or v >= minimum))

    bound = "" if minimum is None else f" >= {minimum}"
    return Setting(default, accepts, f"an integer{bound}" + (" or null" if nullable else ""))


def Num(default, minimum=None, above=None, below=None, nullable=False) -> Setting:
    """A number: `minimum` inclusive, `above` and `below` exclusive bounds."""
    def accepts(v):
        return (nullable and v is None) or (_number(v) and (minimum is None or v >= minimum)
                                              and (above is None or v > above) and (below is None or v < below))

    bounds = [f"{sign} {b}" for sign, b in ((">=", minimum), (">", above), ("<", below)) if b is not None]
    return Setting(default, accepts, "a number" + (f" {' and '.join(bounds)}" if bounds else "")
                   + (" or null" if nullable else ""))


def Bool(default) -> Setting:
    return Setting(default, lambda v: isinstance(v, bool), "true or false")


def Str(default, nullable=False, required=False) -> Setting:
    return Setting(default, lambda v: (nullable and v is None) or (isinstance(v, str) and v != ""),
                   "a text" + (" or null" if nullable else ""), required)


def Choice(default, *options) -> Setting:
    return Setting(default, lambda v: v in options, f"one of {', '.join(str(o) for o in options)}")


def Texts(default, required=False, single_ok=False) -> Setting:
    """A list of texts (a single text too where single_ok: it becomes a one-item list)."""
    return Setting(default, lambda v: (single_ok and isinstance(v, str)) or
                   (isinstance(v, list) and all(isinstance(t, str) for t in v)), "a list of texts", required,
                   normalize=lambda v: [v] if isinstance(v, str) else v)


def _questions(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(q, dict) and isinstance(q.get("prompt"), str) and isinstance(q.get("expect"), list)
        and q["expect"] for q in value)


def _targets(value) -> bool:
    return value == "all-linear" or (isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value))


def _dpo_losses(value) -> bool:
    return value in DPO_LOSSES or (isinstance(value, list) and bool(value) and all(v in DPO_LOSSES for v in value)
                                   and len(set(value)) == len(value))


def _loss_weights(value) -> bool:
    return value is None or (isinstance(value, list) and bool(value) and all(_number(v) and v > 0 for v in value))


def _tie_breakers(value) -> bool:
    return isinstance(value, list) and all(isinstance(b, str) and b.rsplit(":", 1)[-1] in ("min", "max") and ":" in b
                                           for b in value)


DTYPES = ("auto", "float32", "bfloat16", "float16")
# TRL 1.16's DPO loss variants (DPOConfig.loss_type)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

# one standard lm-eval task over a local file (evaluate.lm_eval.local_data.<task>; ftq.evaluation.local_data)
LOCAL_TASK = {
    "path": Str(None, required=True),
    "format": Choice("auto", *LOCAL_FORMATS),
    "split": Str(None, nullable=True),  # the task's split the file is (null: the split the task evaluates on)
    "sample": Int(0, minimum=0),        # a seeded sample of the items, the same for every candidate (0: all)
    "seed": Int(0, minimum=0),
}

SCHEMA: dict[str, dict] = {
    "base": {
        "source": Str("embedded"),
        "revision": Str(None, nullable=True),
        "dtype": Choice("auto", *DTYPES),
        "trust_remote_code": Bool(False),
    },
    "data": {
        "registry": Str("data/datasets.yaml"),
        "datasets": Texts(None, required=True, single_ok=True),
        "eval_size": Num(0.0, minimum=0),
        "seed": Int(42, minimum=0),
        "max_length": Int(512, minimum=8),
        "truncation": Choice("right", *TRUNCATION),
        "on_error": Choice("fail", "fail", "skip"),
    },
    "train": {
        "method": Choice("lora", "full", "lora", "qlora"),
        "output_dir": Str("models/adapter"),
        "lora": {
            "rank": Int(16, minimum=1),
            "alpha": Num(32, above=0),
            "dropout": Num(0.0, minimum=0, below=1),
            "target_modules": Setting("all-linear", _targets, "all-linear or a list of module names"),
        },
        "optim": Choice("adamw_torch", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"),
        "attn_implementation": Choice("sdpa", "sdpa", "eager", "flash_attention_2"),
        "learning_rate": Num(5e-4, above=0),
        "lr_scheduler": Choice("cosine", "cosine", "linear", "constant"),
        "warmup": Num(0.1, minimum=0),
        "epochs": Num(1.0, minimum=0),
        "max_steps": Int(-1),
        "per_device_batch_size": Int(8, minimum=1),
        "gradient_accumulation": Int(1, minimum=1),
        "weight_decay": Num(0.0, minimum=0),
        "max_grad_norm": Num(1.0, minimum=0),
        "gradient_checkpointing": Bool(False),
        "seed": Int(42, minimum=0),
        "precision": Choice("auto", "auto", "fp32", "bf16", "fp16"),
        "group_by_length": Bool(True),
        "packing": Bool(False),
        "logging_steps": Int(1, minimum=1),
        "eval_steps": Int(23, minimum=0),
        "save_steps": Int(15, minimum=1),
        "save_total_limit": Int(2, minimum=1),
        "keep_checkpoints": Bool(False),
        "checkpoint_dir": Str("models/checkpoints/train"),
        "torch_threads": Int(0, minimum=0),
        "nproc_per_node": Int(1, minimum=1),
        "nnodes": Int(1, minimum=1),
        "node_rank": Int(0, minimum=0),
        "master_addr": Str("127.0.0.1"),
        "master_port": Int(29500, minimum=1),
        "deepspeed": Str(None, nullable=True),
    },
    # preference tuning after SFT (or on the base): its own stage between train and merge (ftq.stages.preference)
    "preference": {
        "objective": Choice("none", "none", "dpo", "orpo", "simpo", "kto"),
        "start_from": Choice("sft", "sft", "base"),  # sft: train's output (train.method's weights); base: models/base
        "datasets": Texts(["ftq_default_pairs"], single_ok=True),  # data/datasets.yaml entries with ranking or kto_tag
        "eval_datasets": Texts(["ftq_default_pairs_heldout"], single_ok=True),  # held-out pairs: pref_accuracy
        "eval_examples": Int(0, minimum=0),  # the first N held-out pairs (0: all)
        "max_length": Int(512, minimum=8),  # prompt + the longer answer, in tokens
        "truncation": Choice("right", *TRUNCATION),
        "beta": Num(0.1, above=0),  # DPO/KTO: the KL weight; ORPO: the odds-ratio weight (lambda); SimPO: reward scale
        # DPO's loss variant (TRL's names), or several summed (e.g. [sigmoid, sft]: DPO plus the chosen
        # answers' NLL, RPO), weighted by loss_weights (null: 1 each)
        "loss_type": Setting("sigmoid", _dpo_losses, f"one of {', '.join(DPO_LOSSES)} or a list of them"),
        "loss_weights": Setting(None, _loss_weights, "null or a list of numbers > 0, one per loss_type"),
        "label_smoothing": Num(0.0, minimum=0, below=0.5),  # DPO/SimPO: conservative (noisy-label) loss
        "simpo_gamma": Num(0.5, minimum=0),  # SimPO's target reward margin
        "desirable_weight": Num(1.0, above=0),  # KTO: weights of desirable and undesirable answers
        "undesirable_weight": Num(1.0, above=0),
        "learning_rate": Num(5e-5, above=0),
        "lr_scheduler": Choice("cosine", "cosine", "linear", "constant"),
        "warmup": Num(0.1, minimum=0),
        "epochs": Num(1.0, minimum=0),
        "max_steps": Int(-1),
        "per_device_batch_size": Int(4, minimum=1),
        "gradient_accumulation": Int(1, minimum=1),
        "seed": Int(42, minimum=0),
        "logging_steps": Int(1, minimum=1),
        "save_steps": Int(15, minimum=1),
        "save_total_limit": Int(2, minimum=1),
        "keep_checkpoints": Bool(False),
        "output_dir": Str("models/preference"),
        "checkpoint_dir": Str("models/checkpoints/preference"),
    },
    "merge": {
        "max_shard_size": Str("2GB"),
        "dtype": Choice("auto", *DTYPES),
        "check": {
            "examples": Int(8, minimum=1),
            "max_length": Int(256, minimum=8),
            "max_residual_ratio": Setting("auto", lambda v: v == "auto" or v is None or (_number(v) and 0 < v < 1),
                                       "auto or a number between 0 and 1"),
        },
    },
    "quantize": {
        "enabled": Texts([]),
        # each build's options are checked by its backend (ftq.quantize), which knows its method
        "builds": Setting({}, lambda v: isinstance(v, dict) and all(isinstance(b, dict) for b in v.values()),
                       "a mapping of build names to {method: ..., options}"),
        "calibration": {
            "split": Choice("train", "train", "eval"),
            "samples": Int(128, minimum=1),
            "max_length": Int(512, minimum=8),
            "seed": Int(0, minimum=0),
        },
        # llama.cpp's importance matrix (stage imatrix), from a seeded sample of the prepared train split
        "imatrix": {
            "samples": Int(128, minimum=1),  # training conversations (task and replay, as training saw them)
            "max_length": Int(512, minimum=8),  # each cut to this many tokens
            "chunk_size": Int(512, minimum=32),  # llama-imatrix's context: the text is read in chunks of this size
            "seed": Int(0, minimum=0),
        },
        "reference": {
            "examples": Int(64, minimum=1),
            "max_length": Int(512, minimum=1),
            "seed": Int(0, minimum=0),
            "top_k": Int(256, minimum=1),
        },
        "check": {
            "prompt": Str("Who are you?"),
            "max_new_tokens": Int(48, minimum=1),
            "max_kld_mean": Num(0.05, minimum=0),
            "max_kld_p99": Num(0.5, minimum=0),
            "min_top1_agreement": Num(0.90, minimum=0),
        },
    },
    "evaluate": {
        "task_examples": Int(48, minimum=0),
        "max_new_tokens": Int(40, minimum=1),
        "answer_batch_size": Int(48, minimum=1),
        "perplexity_examples": Int(16, minimum=0),
        "perplexity_max_length": Int(512, minimum=8),
        "speed_prompts": Texts(["Who are you?", "Write one sentence about the sea.", "What is 12 times 7?"]),
        "speed_max_new_tokens": Int(16, minimum=2),
        "speed_repeats": Int(3, minimum=1),
        "general": {
            "max_new_tokens": Int(48, minimum=1),
            "questions": Setting([], _questions, "a list of {prompt: <text>, expect: [<word>, ...]}"),
        },
        "lm_eval": {
            "tasks": Texts([], single_ok=True),
            "include_path": Texts([], single_ok=True),
            "limit": Int(12, minimum=0),
            "num_fewshot": Int(None, minimum=0, nullable=True),
            "apply_chat_template": Bool(False),
            "batch_size": Int(8, minimum=1),
            "dtype": Choice("auto", *DTYPES),
            "max_length": Int(2048, minimum=8),
            "max_gen_toks": Int(64, minimum=1),
            "text": Str(None, nullable=True),
            "local_data": Entries(LOCAL_TASK, {"hellaswag": {
                "path": "../shared/data/hellaswag/hellaswag_val_full.txt", "format": "llama.cpp-hellaswag",
                "split": None, "sample": 300, "seed": 0}}),
        },
        "mt_bench": {
            "path": Str(None, nullable=True),  # a folder in FastChat's layout, e.g. ../shared/data/mt_bench
            "judge": {
                "base_url": Str(None, nullable=True),
                "model": Str(None, nullable=True),
                "api_key_env": Str("OPENAI_API_KEY", nullable=True),
            },
            "limit": Int(0, minimum=0),
            "max_new_tokens": Int(512, minimum=1),
            "retries": Int(2, minimum=0),
        },
    },
    "promote": {
        "model_name": Str("ftq-smollm2"),
        "policy": {
            "metric": Str("task_json_field_accuracy"),  # promote checks it is scored per example
            "direction": Choice("max", "max", "min"),
            "min_retention": Num(0.95, minimum=0),
            "max_size_bytes": Int(None, minimum=1, nullable=True),
            "confidence": Num(0.95, minimum=0.5, below=1),
            "general_guard": {  # a build whose paired difference vs merged on a standard task lies wholly below
                "task": Str("hellaswag", nullable=True),   # -tolerance is rejected (null: no guard)
                "metric": Str("acc_norm"),
                "tolerance": Num(0.02, minimum=0),
            },
            # smallest_tied: the smallest build tied with merged (builds evaluated smallest first, stopping at
            # the first tied one); best: every build evaluated, the best by the metric (ftq.selection)
            "select": Choice("smallest_tied", "smallest_tied", "best"),
            "tie_breakers": Setting(["size_bytes:min", "relative_tokens_per_second:max"], _tie_breakers,
                                 "a list like [size_bytes:min, relative_tokens_per_second:max]"),
        },
    },
    "tracking": {
        "experiment": Str("ftq"),
        "uri": Str(None, nullable=True),
    },
}

# keys that moved: the old name is refused with where the setting lives now
MOVED = {"evaluate.lm_eval.choices": "ftq_heldout_choice was removed (every candidate scored 1.0 on it: it separated "
                                    "nothing); HellaSwag (evaluate.lm_eval.local_data) measures general ability now",
         "evaluate.lm_eval.seed": "it seeded ftq_heldout_choice, which was removed; a local task's sample has its own "
                                  "seed (evaluate.lm_eval.local_data.<task>.seed)",
         "data.packing": "packing is a training setting now: move it to train.packing (toggling it then reruns "
                         "train alone, not prepare and every evaluation)"}


def defaults(name: str) -> dict[str, Any]:
    """A block's defaults (what every key left out of params.yaml means)."""
    return _defaults(SCHEMA[name])


def _defaults(tree: dict) -> dict[str, Any]:
    return {key: _defaults(s) if isinstance(s, dict) else _entries_default(s) if isinstance(s, Entries) else s.default
            for key, s in tree.items()}


def _entries_default(setting: Entries) -> dict:
    return {name: {**_defaults(setting.entry), **block} for name, block in setting.default.items()}


def settings(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One block of params.yaml, validated against SCHEMA and completed with its defaults."""
    path = params.get("_path", "params.yaml")
    given = params.get(name)
    if given is None and name == "tracking":  # optional: MLflow's defaults
        given = {}
    if not isinstance(given, dict):
        raise ParamsError(f"{path}: missing block '{name}'" if given is None
                          else f"{path}: {name}: expected a mapping of settings, got {given!r}")
    return _validate(SCHEMA[name], given, name, path)


def part(dotted: str, given: dict | None, path: str = "params.yaml", where: str | None = None,
         fill: bool = True) -> dict[str, Any]:
    """A sub-block (e.g. "evaluate.lm_eval"), validated and completed on its own; `where` names it in
    errors when it comes from elsewhere (a build's own `check` overrides "quantize.check"); fill=False
    returns only the keys given (an override of values already complete)."""
    tree: Any = SCHEMA
    for key in dotted.split("."):
        tree = tree[key]
    if given is not None and not isinstance(given, dict):
        raise ParamsError(f"{path}: {where or dotted}: expected a mapping of settings, got {given!r}")
    return _validate(tree, given or {}, where or dotted, path, fill)


def _validate(schema: dict, given: dict, where: str, path: str, fill: bool = True) -> dict[str, Any]:
    for key in given:
        if key not in schema:
            dotted = f"{where}.{key}"
            if dotted in MOVED:
                raise ParamsError(f"{path}: {dotted}: {MOVED[dotted]}")
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(schema)}"
            raise ParamsError(f"{path}: {dotted}: unknown key ({hint})")
    values = {}
    for key, setting in schema.items():
        dotted = f"{where}.{key}"
        if isinstance(setting, dict):
            sub = given.get(key)
            if sub is not None and not isinstance(sub, dict):
                raise ParamsError(f"{path}: {dotted}: expected a mapping of settings, got {sub!r}")
            if fill or sub is not None:
                values[key] = _validate(setting, sub or {}, dotted, path, fill)
        elif isinstance(setting, Entries):
            if key not in given:
                if fill:
                    values[key] = _entries_default(setting)
                continue
            if not isinstance(given[key], dict):
                raise ParamsError(f"{path}: {dotted}: expected a mapping of names to blocks, got {given[key]!r}")
            values[key] = {}
            for name, block in given[key].items():
                if not isinstance(block, dict):
                    raise ParamsError(f"{path}: {dotted}.{name}: expected a mapping of settings, got {block!r}")
                values[key][name] = _validate(setting.entry, block, f"{dotted}.{name}", path, fill)
        elif key not in given:
            if not fill:
                continue
            if setting.required:
                raise ParamsError(f"{path}: {dotted}: missing ({setting.expect})")
            values[key] = setting.default
        elif not setting.accepts(given[key]):
            raise ParamsError(f"{path}: {dotted}: expected {setting.expect}, got {given[key]!r}")
        else:
            values[key] = setting.normalize(given[key]) if setting.normalize else given[key]
    return values

