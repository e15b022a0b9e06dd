"""Stage `merge`: fold the trained adapter into the base weights (or package a fully fine-tuned model)
as one plain Hugging Face folder, the single source every quantized build is made from.

Outputs:
  models/merged/        safetensors shards (merge.max_shard_size), tokenizer, chat template, generation
                        config, README.md (model card with lineage) and ftq_merge.json (the same, as JSON)
  reports/merge.json    the logits check, sizes and timings

The check: on a fixed batch of prepared examples, the saved merged model's logits must equal the
unmerged base + adapter logits within a tolerance, with no NaN or Inf; otherwise nothing is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftq.io import atomic_dir, atomic_write_json, atomic_write_text, dir_size
from ftq.params import ParamsError, block, params_hash, repo_root

log = logging.getLogger(__name__)

OUTPUT_DIR = Path("models/merged")
REPORT = Path("reports/merge.json")
INFO_FILE = "ftq_merge.json"
# max |logit difference| allowed between the saved merged model and base + adapter, per saved dtype:
# float32 differs only by summation order; half precisions round every weight once more
DEFAULT_ATOL = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce base + adapter (or produced NaN/Inf)."""


@dataclass
class MergeSettings:
    max_shard_size: str = "2GB"
    dtype: str = "auto"  # auto: the base's dtype
    check_examples: int = 8
    check_max_length: int = 256
    atol: float | None = None  # None: DEFAULT_ATOL for the saved dtype

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MergeSettings":
        cfg = dict(block(params, "merge"))
        check = cfg.pop("check", None) or {}
        unknown = set(cfg) - {"max_shard_size", "dtype"} | set(check) - {"examples", "max_length", "atol"}
        where = params.get("_path", "params.yaml")
        if unknown:
            raise ParamsError(f"{where}: merge: unknown keys {sorted(unknown)}")
        settings = cls(
            max_shard_size=str(cfg.get("max_shard_size", "2GB")),
            dtype=str(cfg.get("dtype", "auto")),
            check_examples=int(check.get("examples", 8)),
            check_max_length=int(check.get("max_length", 256)),
            atol=None if check.get("atol") in (None, "auto") else float(check["atol"]),
        )
        if settings.dtype != "auto" and settings.dtype not in DTYPES:
            raise ParamsError(f"{where}: merge.dtype '{settings.dtype}': expected auto, {', '.join(DTYPES)}")
        if settings.check_examples < 1:
            raise ParamsError(f"{where}: merge.check.examples must be >= 1")
        return settings


@dataclass
class MergeResult:
    output_dir: Path
    report: dict[str, Any]


def trained_output(params: dict[str, Any], root: Path) -> tuple[str, Path]:
    train = block(params, "train")
    method = str(train.get("method", "lora"))
    folder = root / str(train.get("output_dir") or ("models/full" if method == "full" else "models/adapter"))
    marker = "config.json" if method == "full" else "adapter_config.json"
    if not (folder / marker).exists():
        raise FileNotFoundError(f"{folder}: no trained {method} output ({marker}); run `dvc repro train` first")
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
    model.eval()
    return model(**batch, use_cache=False).logits.float()


def compare_logits(reference: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor, atol: float) -> dict[str, Any]:
    keep = mask.bool()
    ref, got = reference[keep], merged[keep]
    finite = bool(torch.isfinite(got).all())
    diff = (ref - got).abs()
    result = {
        "max_abs_logit_diff": float(diff.max()) if finite else float("inf"),
        "mean_abs_logit_diff": float(diff.mean()) if finite else float("inf"),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "positions": int(keep.sum()),
        "finite": finite,
        "atol": atol,
    }
    result["passed"] = finite and result["max_abs_logit_diff"] <= atol
    return result


def load_merged_in_memory(method: str, trained: Path, base_dir: Path):
    """(reference model, merged model, tokenizer): reference is what training produced, unmerged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)
        return model, model, AutoTokenizer.from_pretrained(trained)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, trained)
    return reference, None, AutoTokenizer.from_pretrained(trained)


def saved_dtype(settings: MergeSettings, base_dir: Path) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    config = json.loads((base_dir / "config.json").read_text())
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return stored if stored in DTYPES else "float32"


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
        "git_rev": git_rev(root),
    }


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
Logits of this folder vs. the unmerged base + adapter on {check['positions']} token positions of the
held-out data: max |diff| {check['max_abs_logit_diff']:.3g} (tolerance {check['atol']:g}),
top-1 agreement {check['top1_agreement']:.4f}, all finite: {check['finite']}.

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("models/merged")
tokenizer = AutoTokenizer.from_pretrained("models/merged")
```
"""


def run(params: dict[str, Any]) -> MergeResult:
    from ftq.stages.train import peak_memory_bytes
    from ftq.tracking import stage_run

    settings = MergeSettings.from_params(params)
    root = repo_root()
    method, trained = trained_output(params, root)
    base_dir = root / "models" / "base"
    out_dir = root / OUTPUT_DIR
    dtype = saved_dtype(settings, base_dir)
    atol = settings.atol if settings.atol is not None else DEFAULT_ATOL[dtype]
    with stage_run("merge", params) as tracked:
        started = time.time()
        reference, merged, tokenizer = load_merged_in_memory(method, trained, base_dir)
        batch = check_batch(root, tokenizer, settings)
        expected = logits_of(reference, batch)
        if merged is None:
            merged = reference.merge_and_unload()
        merged = merged.to(DTYPES[dtype])
        with atomic_dir(out_dir) as tmp:
            save_sharded(merged, tokenizer, tmp, settings.max_shard_size)
            check = compare_logits(expected, logits_of(reload(tmp), batch), batch["attention_mask"], atol)
            if not check["passed"]:
                raise MergeCheckError(
                    f"{out_dir}: merged logits differ from base + adapter: max |diff| {check['max_abs_logit_diff']:.4g} "
                    f"> tolerance {atol:g} (finite: {check['finite']}); nothing was written"
                )
            info = {
                "dtype": dtype,
                "num_parameters": sum(p.numel() for p in merged.parameters()),
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
            "max_abs_logit_diff": check["max_abs_logit_diff"],
            "mean_abs_logit_diff": check["mean_abs_logit_diff"],
            "top1_agreement": check["top1_agreement"],
            "check_positions": check["positions"],
            "atol": atol,
            "wall_seconds": round(time.time() - started, 2),
            "peak_memory_bytes": peak_memory_bytes(),
        }
        atomic_write_json(root / REPORT, report)
        tracked.log_metrics({k: v for k, v in report.items() if k not in ("method", "dtype")})
        tracked.set_tags({"merge.method": method, "merge.dtype": dtype,
                          "lineage.train_run_id": info["lineage"]["train_mlflow_run_id"]})
        tracked.log_artifact(root / REPORT)
        tracked.log_artifact(out_dir / "README.md")
        tracked.log_artifact(out_dir / INFO_FILE)
    log.info("merged %s into %s (%s, %d shard(s)); logits max |diff| %.3g <= %g",
             method, out_dir, dtype, report["shards"], check["max_abs_logit_diff"], atol)
    return MergeResult(out_dir, report)


def save_sharded(model, tokenizer, folder: Path, max_shard_size: str) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)


def reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
