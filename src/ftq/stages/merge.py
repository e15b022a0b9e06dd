"""Stage `merge`: fold the trained adapter into the base weights (or package a fully fine-tuned model)
as one plain Hugging Face folder, the single source every quantized build is made from.

Outputs:
  models/merged/        safetensors shards (merge.max_shard_size), tokenizer, chat template, generation
                        config, README.md (model card with lineage) and ftq_merge.json (the same, as JSON)
  reports/merge.json    the logits check, sizes and timings

The check, with its baseline: on a fixed batch of held-out examples, the fine-tune's effect is how far
base + adapter's logits are from the base's (`adapter_effect_max_abs`), and the merge's residual is how
far the saved merged model's logits are from base + adapter's (`merge_residual_max_abs`). The residual
must be at most `merge.check.max_residual_ratio` (its auto value in float32: 0.01) of the effect, the effect above 0, and
every logit finite; otherwise nothing is written. A merge that drops the adapter has a residual equal to
the effect and fails however small the adapter's effect is, where an absolute tolerance would pass it.
For a full fine-tune the "adapter" is the trained model itself.

QLoRA trained its adapter on the 4-bit NF4 base; the merge folds it into the original-precision base (as
peers export QLoRA), so the check above runs on the original base, and the merged model is also compared
with the 4-bit model it was trained as: it must be closer to it (mean |logit diff|) than the base without
the adapter is (`qlora_reference_residual_mean_abs` < `qlora_dropped_adapter_mean_abs`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftq.errors import MergeCheckError
from ftq.io import atomic_dir, atomic_write_json, atomic_write_text, dir_size
from ftq.memory import release
from ftq import schema
from ftq.params import block, params_hash, repo_root
from ftq.provenance import stamp

log = logging.getLogger(__name__)

OUTPUT_DIR = Path("models/merged")
REPORT = Path("reports/merge.json")
INFO_FILE = "ftq_merge.json"
# merge residual allowed, as a fraction of the adapter's effect, per saved dtype: float32 differs only by
# summation order; half precisions round every merged weight once more (measured: see docs/pipeline.md#stage-merge-one-merged-checkpoint)
DEFAULT_MAX_RESIDUAL_RATIO = {"float32": 0.01, "float16": 0.02, "bfloat16": 0.05}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeSettings:
    max_shard_size: str
    dtype: str  # auto: the base's dtype
    check_examples: int
    check_max_length: int
    max_residual_ratio: float | None  # None: DEFAULT_MAX_RESIDUAL_RATIO for the saved dtype

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MergeSettings":
        cfg = schema.settings(params, "merge")
        ratio = cfg["check"]["max_residual_ratio"]
        return cls(max_shard_size=cfg["max_shard_size"], dtype=cfg["dtype"], check_examples=cfg["check"]["examples"],
                   check_max_length=cfg["check"]["max_length"], max_residual_ratio=None if ratio in (None, "auto") else float(ratio))


@dataclass
class MergeResult:
    output_dir: Path
    report: dict[str, Any]


def trained_output(params: dict[str, Any], root: Path) -> tuple[str, Path]:
    from ftq.training.settings import TrainSettings

    train = TrainSettings.from_params(params)
    tuned = schema.settings(params, "preference")
    stage = "train" if tuned["objective"] == "none" else "preference"
    method, folder = train.method, root / (train.output_dir if stage == "train" else tuned["output_dir"])
    marker = "config.json" if method == "full" else "adapter_config.json"
    if not (folder / marker).exists():
        raise FileNotFoundError(f"{folder}: no trained {method} output ({marker}); run `dvc repro {stage}` first")
    return method, folder


def check_batch(root: Path, tokenizer, settings: MergeSettings) -> dict[str, torch.Tensor]:
    """A fixed batch: the first prepared eval examples (train if there is no eval split), padded."""
    from datasets import load_from_disk

    processed = root / "data" / "processed"
    split = processed / "eval" if (processed / "eval").exists() else processed / "train"
    if not split.exists():
        raise FileNotFoundError(f"{processed}: no prepared data for the merge check; run `dvc repro prepare`")
    rows = load_from_disk(str(split))
    rows = rows.select(range(min(settings.check_examples, len(rows))))
    sequences = [list(r["input_ids"])[: settings.check_max_length] for r in rows]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits on the CPU, whatever device and dtype the model is in."""
    model.eval()
    on_device = {k: v.to(model.device) for k, v in batch.items()}
    return model(**on_device, use_cache=False).logits.float().cpu()


GPU_SHARE = 0.9  # of the GPU's free memory the weights may take (the CUDA context and allocator need some)


def merge_device_map(model_bytes: int, free_gpu_bytes: int | None, gpu: int = 0,
                     free_cpu_bytes: int | None = None, reserve_bytes: int = 0) -> dict[str, Any]:
    """from_pretrained's placement for the merge: the whole model on the GPU where it fits there (with
    `reserve_bytes` for the check's activations), else as much as fits on that GPU and the rest in CPU
    memory (accelerate's offload: a model that fits in RAM but not on one GPU still merges); on the CPU
    without a GPU (`free_gpu_bytes` None)."""
    if free_gpu_bytes is None:
        return {"device_map": {"": "cpu"}}
    budget = max(int(free_gpu_bytes * GPU_SHARE) - reserve_bytes, 0)
    if model_bytes <= budget:
        return {"device_map": {"": gpu}}
    memory: dict[Any, int] = {gpu: budget}  # this GPU only: never the other GPUs of a shared host
    if free_cpu_bytes is not None:
        memory["cpu"] = int(free_cpu_bytes * GPU_SHARE)
    return {"device_map": "auto", "max_memory": memory}


def weights_numel(folder: Path) -> int:
    """Elements in a folder's safetensors weights, read from the files' headers (no tensor is loaded)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def free_gpu_bytes(gpu: int) -> int:
    """Free memory on that GPU, with what torch's allocator holds unused (it hands that out again)."""
    free, _total = torch.cuda.mem_get_info(gpu)
    return free + torch.cuda.memory_reserved(gpu) - torch.cuda.memory_allocated(gpu)


def check_reserve(folder: Path, batch: dict[str, torch.Tensor] | None, dtype: str) -> int:
    """GPU memory the check's forward pass needs beyond the weights: its logits, in the model's dtype and
    as the float32 copy logits_of makes."""
    if batch is None:
        return 0
    config = json.loads((Path(folder) / "config.json").read_text())
    vocab = int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0)
    return batch["input_ids"].numel() * vocab * (DTYPES[dtype].itemsize + 4)


def placement(dtype: str, folder: Path | None = None, batch: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Where the model in `folder` loads for the merge: on the GPU when there is one and it fits there
    (the whole model in the working dtype), offloaded in part to CPU memory when it does not, else on the
    CPU; never a float32 copy of a bfloat16 base."""
    import psutil

    from ftq.hf import load_kwargs

    kwargs = {**load_kwargs(), "dtype": DTYPES[dtype]}
    if not torch.cuda.is_available():
        return {**kwargs, **merge_device_map(0, None)}
    gpu = torch.cuda.current_device()
    model_bytes = weights_numel(folder) * DTYPES[dtype].itemsize if folder is not None else 0
    reserve = check_reserve(folder, batch, dtype) if folder is not None else 0
    return {**kwargs, **merge_device_map(model_bytes, free_gpu_bytes(gpu), gpu, psutil.virtual_memory().available,
                                         reserve)}


def offloaded(kwargs: dict[str, Any]) -> bool:
    return kwargs["device_map"] == "auto"


def devices_of(model) -> str:
    """Where a model's weights are: one device (cuda:0, cpu), or the GPU and CPU of an offloaded model."""
    mapped = set(getattr(model, "hf_device_map", {}).values())
    if len(mapped) <= 1:
        return str(model.device)
    names = {f"cuda:{d}" if isinstance(d, int) else str(d) for d in mapped}
    return "+".join(sorted(names, key=lambda name: (name == "cpu", name)))


def distance(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """(max, mean) |a - b| over the real (unpadded) positions."""
    diff = (a[keep] - b[keep]).abs()
    return float(diff.max()), float(diff.mean())


def check_merge(base: torch.Tensor, expected: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor,
                max_ratio: float) -> dict[str, Any]:
    """The merged model's logits against base + adapter's (`expected`), measured against the adapter's
    own effect on the base's logits."""
    keep = mask.bool()
    finite = bool(torch.isfinite(merged[keep]).all()) and bool(torch.isfinite(expected[keep]).all())
    effect_max, effect_mean = distance(expected, base, keep)
    residual_max, residual_mean = distance(merged, expected, keep) if finite else (float("inf"), float("inf"))
    ratio = residual_max / effect_max if effect_max > 0 else float("inf")
    return {
        "adapter_effect_max_abs": effect_max,
        "adapter_effect_mean_abs": effect_mean,
        "merge_residual_max_abs": residual_max,
        "merge_residual_mean_abs": residual_mean,
        "residual_ratio": ratio,
        "max_residual_ratio": max_ratio,
        "top1_agreement": float((expected[keep].argmax(-1) == merged[keep].argmax(-1)).float().mean()),
        "positions": int(keep.sum()),
        "finite": finite,
        "passed": finite and effect_max > 0 and ratio <= max_ratio,
    }


def failure(check: dict[str, Any]) -> str:
    if not check["finite"]:
        return "merged (or base + adapter) logits are NaN or Inf"
    if check["adapter_effect_max_abs"] == 0:
        return "the adapter does not change the base's logits at all (an untrained or empty adapter)"
    if "qlora_reference_residual_mean_abs" in check and not check["qlora_closer_than_dropped"]:
        return (f"the merged model is no closer to the 4-bit model it was trained as (mean |diff| "
                f"{check['qlora_reference_residual_mean_abs']:.4g}) than the base without the adapter is "
                f"({check['qlora_dropped_adapter_mean_abs']:.4g})")
    return (f"merged logits differ from base + adapter by {check['merge_residual_max_abs']:.4g} (max |diff|), "
            f"{100 * check['residual_ratio']:.3g} % of the adapter's effect {check['adapter_effect_max_abs']:.4g}; "
            f"allowed {100 * check['max_residual_ratio']:g} %")


def trained_logits(method: str, trained: Path, base_dir: Path, batch: dict[str, torch.Tensor], dtype: str,
                   kwargs: dict[str, Any] | None = None):
    """(base logits, base + adapter logits, model to merge), on the original base in the base's dtype,
    loaded with `kwargs` (default: `placement`). For a full fine-tune the trained model is the merged model,
    and the base is loaded to measure the effect; only one model is held at a time."""
    from transformers import AutoModelForCausalLM

    kwargs = kwargs or placement(dtype, base_dir, batch)
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if method == "full":
        base_logits = logits_of(base, batch)
        del base
        release()
        model = AutoModelForCausalLM.from_pretrained(trained, **kwargs)
        return base_logits, logits_of(model, batch), model
    from peft import PeftModel

    from ftq.training.model import no_gptqmodel_probe

    with no_gptqmodel_probe():
        reference = PeftModel.from_pretrained(base, trained)
    with reference.disable_adapter():
        base_logits = logits_of(reference, batch)
    return base_logits, logits_of(reference, batch), reference


def qlora_reference(trained: Path, base_dir: Path, batch: dict[str, torch.Tensor], base_logits: torch.Tensor,
                    merged_logits: torch.Tensor) -> dict[str, Any]:
    """The merged model against the 4-bit base + adapter that training optimised, with its baseline: the
    original base without the adapter against the same reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftq.training.model import check_bitsandbytes, keep_cpu_4bit_trainable, no_gptqmodel_probe

    check_bitsandbytes()
    # training's 4-bit settings (training/model.py), computing in float32 for the most exact reference
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    quantized = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, dtype=torch.float32,
                                                     device_map=device_map)
    if not torch.cuda.is_available():
        keep_cpu_4bit_trainable(quantized)
    on_device = {k: v.to(quantized.device) for k, v in batch.items()}  # 4-bit layers run where bitsandbytes put them
    with no_gptqmodel_probe():
        adapted = PeftModel.from_pretrained(quantized, trained)
    reference = logits_of(adapted, on_device).cpu()
    keep = batch["attention_mask"].bool()
    merged_mean = distance(merged_logits, reference, keep)[1]
    dropped_mean = distance(base_logits, reference, keep)[1]
    return {"qlora_reference_residual_mean_abs": merged_mean, "qlora_dropped_adapter_mean_abs": dropped_mean,
            "qlora_closer_than_dropped": merged_mean < dropped_mean}


def base_dtype(base_dir: Path) -> str:
    from ftq.hf import stored_dtype

    stored = stored_dtype(base_dir)
    return stored if stored in DTYPES else "float32"


def saved_dtype(settings: MergeSettings, base_dir: Path) -> str:
    return settings.dtype if settings.dtype != "auto" else base_dtype(base_dir)


def lineage(params: dict[str, Any], root: Path, method: str, trained: Path) -> dict[str, Any]:
    from ftq.tracking import data_md5, git_rev, latest_run_id

    base_info = json.loads((root / "models" / "base" / "base.json").read_text())
    train_info_path = trained / "ftq_train.json"
    train_info = json.loads(train_info_path.read_text()) if train_info_path.exists() else {}
    return {
        "base_source": base_info.get("source"),
        "base_architecture": base_info.get("architecture"),
        "base_sha256": params_hash({k: v["sha256"] for k, v in base_info["files"].items()}),
        "data_md5": data_md5(root),
        "train_method": method,
        "train_params": train_info.get("settings", {}),
        "train_params_hash": params_hash(block(params, "train")),
        "train_report": {k: train_info.get("report", {}).get(k) for k in ("steps", "eval_loss", "initial_eval_loss")},
        "train_mlflow_run_id": latest_run_id("train", params),
        **preference_lineage(params, trained),
        "git_rev": git_rev(root),
    }


def preference_lineage(params: dict[str, Any], trained: Path) -> dict[str, Any]:
    """The preference stage's objective, settings and held-out scores, where it tuned what is merged."""
    from ftq.tracking import latest_run_id

    info_path = trained / "ftq_preference.json"
    if not info_path.exists():
        return {}
    info = json.loads(info_path.read_text())
    held = info.get("report", {}).get("held_out") or {}
    return {"preference_objective": info["settings"]["objective"],
            "preference_params_hash": params_hash(info["settings"]),
            "preference_report": {k: held.get(k, {}).get("mean") for k in ("pref_accuracy", "reward_margin")},
            "preference_mlflow_run_id": latest_run_id("preference", params)}


def model_card(info: dict[str, Any], check: dict[str, Any]) -> str:
    lin = info["lineage"]
    train = lin["train_params"]
    rows = [
        ("base model", f"`{lin['base_source']}` ({lin['base_architecture']})"),
        ("base weights sha256 (of file hashes)", f"`{lin['base_sha256']}`"),
        ("training data md5", f"`{lin['data_md5']}`"),
        ("fine-tuning", lin["train_method"]),
        ("train params hash", f"`{lin['train_params_hash']}`"),
        ("MLflow train run", f"`{lin['train_mlflow_run_id'] or 'unknown'}`"),
        ("git revision", f"`{lin['git_rev']}`"),
    ]
    settings = ", ".join(f"{k}={train[k]}" for k in ("learning_rate", "epochs", "max_steps", "per_device_batch_size")
                         if k in train)
    if train.get("lora") and lin["train_method"] != "full":
        lora = train["lora"]
        settings += f", LoRA r={lora.get('rank')} alpha={lora.get('alpha')} targets={lora.get('target_modules')}"
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
base_model: {lin['base_source']}
tags: [ftq, {lin['train_method']}, merged]
---
# Merged model (ftq)

Fine-tuned with **{lin['train_method']}** from `{lin['base_source']}` and merged by ftq's `merge` stage
into plain {info['dtype']} safetensors ({info['num_parameters']:,} parameters, {info['shards']} shard(s)).

## Lineage
| what | value |
|---|---|
{table}

Training settings: {settings or 'see ftq_merge.json'}.
Training result: {lin['train_report'].get('steps')} steps, eval loss {lin['train_report'].get('initial_eval_loss')} -> {lin['train_report'].get('eval_loss')}.

## Merge check
On {check['positions']} token positions of held-out data, fine-tuning moves the base's logits by up to
{check['adapter_effect_max_abs']:.3g}; this folder's logits differ from the unmerged base + adapter by at most
{check['merge_residual_max_abs']:.3g}, {100 * check['residual_ratio']:.3g} % of that (allowed
{100 * check['max_residual_ratio']:g} %); top-1 agreement {check['top1_agreement']:.4f}, all finite.

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("models/merged")
tokenizer = AutoTokenizer.from_pretrained("models/merged")
```
"""


def run(params: dict[str, Any]) -> MergeResult:
    from ftq.hf import load_kwargs
    from ftq.memory import peak_memory, reset_cuda_peak
    from ftq.tracking import stage_run

    settings = MergeSettings.from_params(params)
    root = repo_root()
    method, trained = trained_output(params, root)
    base_dir = root / "models" / "base"
    out_dir = root / OUTPUT_DIR
    dtype = saved_dtype(settings, base_dir)
    max_ratio = settings.max_residual_ratio or DEFAULT_MAX_RESIDUAL_RATIO[dtype]
    with stage_run("merge", params) as tracked:
        started = time.time()
        reset_cuda_peak()  # the merge's own CUDA peak, not that of what ran before in this process
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(trained, **load_kwargs())
        batch = check_batch(root, tokenizer, settings)
        work_dtype = base_dtype(base_dir)  # merge at the base's own precision
        kwargs = placement(work_dtype, base_dir, batch)
        if offloaded(kwargs) and work_dtype != dtype:
            # the offloaded weights live in accelerate's hooks, which a cast (.to) does not reach: merge in
            # the saved dtype itself
            work_dtype = dtype
            kwargs = placement(work_dtype, base_dir, batch)
        if offloaded(kwargs):
            log.warning("the model does not fit on cuda:%d: merging with part of it in CPU memory (%s)",
                        torch.cuda.current_device(), kwargs["max_memory"])
        base_logits, expected, model = trained_logits(method, trained, base_dir, batch, work_dtype, kwargs)
        merged = model if method == "full" else model.merge_and_unload()
        if work_dtype != dtype:
            merged = merged.to(DTYPES[dtype])  # parameter by parameter: one extra tensor at a time
        num_parameters = sum(p.numel() for p in merged.parameters())  # offloaded ones too (meta, with shapes)
        device = devices_of(merged)  # where merge_and_unload ran
        on_gpu = "cuda" in device
        with atomic_dir(out_dir) as tmp:
            save_sharded(merged, tokenizer, tmp, settings.max_shard_size)
            del merged, model  # the check reloads what was written: never two copies at once
            release()
            merged_logits = logits_of(reload(tmp, dtype, batch), batch)
            check = check_merge(base_logits, expected, merged_logits, batch["attention_mask"], max_ratio)
            if method == "qlora" and check["passed"]:
                check.update(qlora_reference(trained, base_dir, batch, base_logits, merged_logits))
                check["passed"] = check["qlora_closer_than_dropped"]
            if not check["passed"]:
                raise MergeCheckError(f"{out_dir}: {failure(check)}; nothing was written")
            info = {
                "dtype": dtype,
                "num_parameters": num_parameters,
                "shards": len(list(tmp.glob("*.safetensors"))),
                "lineage": lineage(params, root, method, trained),
                "check": check,
                "tool_versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "peft")},
            }
            atomic_write_json(tmp / INFO_FILE, info)
            atomic_write_text(tmp / "README.md", model_card(info, check))
        report = {
            "method": method,
            "dtype": dtype,
            "num_parameters": info["num_parameters"],
            "shards": info["shards"],
            "size_bytes": dir_size(out_dir),
            **{k: v for k, v in check.items() if k not in ("passed", "finite", "qlora_closer_than_dropped")},
            "wall_seconds": round(time.time() - started, 2),
            "device": device,
            **peak_memory(on_gpu),
        }
        atomic_write_json(root / REPORT, stamp(report))
        tracked.log_metrics({k: float(v) for k, v in report.items() if k not in ("method", "dtype", "device")})
        tracked.set_tags({"merge.method": method, "merge.dtype": dtype,
                          "lineage.train_run_id": info["lineage"]["train_mlflow_run_id"]})
        tracked.log_artifact(root / REPORT)
        tracked.log_artifact(out_dir / "README.md")
        tracked.log_artifact(out_dir / INFO_FILE)
    log.info("merged %s into %s (%s, %d shard(s)); residual %.3g = %.3g %% of the adapter's effect %.3g",
             method, out_dir, dtype, report["shards"], check["merge_residual_max_abs"],
             100 * check["residual_ratio"], check["adapter_effect_max_abs"])
    return MergeResult(out_dir, report)


def save_sharded(model, tokenizer, folder: Path, max_shard_size: str) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)


def reload(folder: Path, dtype: str, batch: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **placement(dtype, folder, batch))
