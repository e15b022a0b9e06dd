"""Stage `preference`: DPO, ORPO, SimPO or KTO (TRL's trainers) on preference pairs, after SFT or on
the base; `preference.objective: none` passes the SFT output through untouched.

The policy is what `train` produced (start_from: sft) or the base (start_from: base), with train.method's
weights: LoRA/QLoRA continue the SFT adapter (TRL keeps a frozen copy of it, adapter-sized, as DPO's and
KTO's reference) or add a new one on the base (the reference is then the policy with its adapter
disabled); full fine-tuning trains the whole model against a frozen copy. ORPO and SimPO need no reference.

Outputs:
  models/preference/              the tuned adapter (or whole model) + tokenizer + ftq_preference.json +
                                  reference_logps.jsonl (the starting model's log-probs of the held-out pairs)
  reports/preference.json         objective, steps, losses, held-out pref_accuracy / reward margin with 95 %
                                  intervals, the starting model beside the tuned one
  reports/preference.pairs.jsonl  per held-out pair scores (ftq.evaluation.preference)
  reports/preference_log.csv      TRL's step-wise loss and reward curves (also in MLflow)

Checkpoints go to preference.checkpoint_dir (not a DVC output), fingerprinted like train's: a killed run
resumes from its last checkpoint on the next `dvc repro`.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftq import schema
from ftq.data.errors import DataError
from ftq.io import atomic_dir, atomic_write_json, atomic_write_text
from ftq.params import ParamsError, params_hash, repo_root
from ftq.provenance import stamp

log = logging.getLogger(__name__)

REPORT = Path("reports/preference.json")
PAIRS = Path("reports/preference.pairs.jsonl")
LOG_CSV = Path("reports/preference_log.csv")
from ftq.layout import PREFERENCE_INFO as INFO_FILE, PREFERENCE_REFERENCE_LOGPS as REFERENCE_LOGPS
CURVES = ("rewards/", "logps/", "logits/", "log_odds", "nll_loss", "kl")
CSV_COLUMNS = ["step", "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies"]


@dataclass
class PreferenceResult:
    output_dir: Path
    report: dict[str, Any]


def settings(params: dict[str, Any]) -> dict[str, Any]:
    cfg = schema.settings(params, "preference")
    where = f"{params.get('_path', 'params.yaml')}: preference."
    losses = dpo_losses(cfg)
    if cfg["objective"] == "kto" and losses != ["sigmoid"]:
        raise ParamsError(f"{where}loss_type: {cfg['loss_type']} is a DPO loss; KTO has its own (leave sigmoid)")
    if cfg["loss_weights"] is not None and len(cfg["loss_weights"]) != len(losses):
        raise ParamsError(f"{where}loss_weights: {len(cfg['loss_weights'])} weight(s) for {len(losses)} loss_type(s) "
                          f"{losses}: give one per loss, or null")
    return cfg


def dpo_losses(cfg: dict[str, Any]) -> list[str]:
    """preference.loss_type as a list (a single name or several summed)."""
    return [cfg["loss_type"]] if isinstance(cfg["loss_type"], str) else list(cfg["loss_type"])


def run(params: dict[str, Any]) -> PreferenceResult:
    from ftq.tracking import stage_run

    cfg = settings(params)
    root = repo_root()
    if cfg["objective"] == "none":
        return _pass_through(cfg, root)
    from ftq.training.settings import TrainSettings

    train = TrainSettings.from_params(params)
    records = load_records(cfg, root)
    expected = fingerprint(cfg, train, root)
    from ftq.training.checkpoints import prepare_checkpoints

    resume = prepare_checkpoints(root / cfg["checkpoint_dir"], expected)
    with stage_run("preference", params) as tracked:
        return _tune(cfg, train, root, records, tracked, resume, expected)


def _pass_through(cfg: dict[str, Any], root: Path) -> PreferenceResult:
    """No preference tuning: an output saying so (merge then takes train's), and empty reports."""
    report = {"objective": "none"}
    with atomic_dir(root / cfg["output_dir"]) as tmp:
        atomic_write_json(tmp / INFO_FILE, report)
    atomic_write_json(root / REPORT, stamp(report))
    atomic_write_text(root / PAIRS, "")
    atomic_write_text(root / LOG_CSV, ",".join(CSV_COLUMNS) + "\n")
    log.info("preference.objective none: merge takes train's output")
    return PreferenceResult(root / cfg["output_dir"], report)


def fingerprint(cfg: dict[str, Any], train, root: Path) -> dict[str, str]:
    """What a checkpoint must match to be resumed: these settings, train's, the starting weights (the base's
    sha256s from base.json, and the SFT output's files where it starts from them), the data files."""
    base_info = json.loads((root / "models" / "base" / "base.json").read_text())
    start = {k: v["sha256"] for k, v in base_info["files"].items()}
    if cfg["start_from"] == "sft":
        folder = root / train.output_dir
        start["sft"] = _digest(sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json")))
    return {"preference": params_hash(cfg), "train": params_hash(asdict(train)), "start": params_hash(start),
            "data": params_hash([_digest([f]) for f in _data_files(cfg, root)])}


def _digest(paths: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def _data_files(cfg: dict[str, Any], root: Path) -> list[Path]:
    from ftq.data.registry import load_registry, select

    registry = root / "data" / "datasets.yaml"
    return [s.file for s in select(load_registry(registry), [*cfg["datasets"], *cfg["eval_datasets"]], registry)]


def load_records(cfg: dict[str, Any], root: Path) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} normalized preference records; any bad record fails the stage
    naming its file, record and field (ftq.data.preference)."""
    from ftq.data import preference
    from ftq.data.check import check_file
    from ftq.data.registry import load_registry, select
    from ftq.data.registry import sample

    registry_path = root / "data" / "datasets.yaml"
    registry = load_registry(registry_path)
    wanted = "unpaired" if cfg["objective"] == "kto" else "pair"
    records: dict[str, list[dict]] = {}
    for split, names in (("train", cfg["datasets"]), ("eval", cfg["eval_datasets"])):
        records[split] = []
        for spec in select(registry, names, registry_path):
            found = preference.kind(spec.format)
            if found is None:
                raise ParamsError(f"{registry_path}: dataset '{spec.name}' holds supervised conversations, not "
                                  "preference records (`ranking: true` or columns.kto_tag): use it in data.datasets")
            if split == "train" and found == "unpaired" and wanted == "pair":
                raise ParamsError(f"{registry_path}: dataset '{spec.name}' holds KTO's labelled single answers; "
                                  f"preference.objective {cfg['objective']} trains on pairs (use kto)")
            check = check_file(spec.file, spec.format)
            if check.errors:
                shown = "\n  ".join(str(e) for e in check.errors[:5])
                raise DataError(f"{spec.file}: {len(check.errors)} bad preference record(s):\n  {shown}", check.errors)
            for record in check.conversations:
                record["id"] = f"{spec.name}:{record['record']}"
            records[split] += sample(check.conversations, spec.num_samples, random.Random(cfg["seed"]))
        if split == "train" and not records[split]:
            raise DataError(f"preference.datasets {names}: no records")
    return records


def tokenized(records: list[dict], tokenizer, cfg: dict[str, Any], kto: bool) -> tuple[list, list[bool], list[str]]:
    """(PreferenceTokens, KTO labels, ids). For KTO a pair gives two labelled answers (chosen desirable,
    rejected not), as LLaMA-Factory and TRL's unpairing do."""
    from ftq.data.tokenize import PreferenceTokens, tokenize_preference

    tokens, labels, ids = [], [], []
    for record in records:
        row = tokenize_preference(tokenizer, record, cfg["max_length"], cfg["truncation"])
        if row is None:
            continue
        if row.truncated:
            log.warning("%s: %s cut to preference.max_length %d", record["id"], ", ".join(row.truncated), cfg["max_length"])
        if not kto:
            tokens.append(row), ids.append(record["id"])
        elif "completion" in row.answers:
            tokens.append(row), labels.append(record["label"]), ids.append(record["id"])
        else:
            for side, label in (("chosen", True), ("rejected", False)):
                tokens.append(PreferenceTokens(row.prompt_ids, {"completion": row.answers[side]}))
                labels.append(label), ids.append(f"{record['id']}:{side}")
    return tokens, labels, ids


def eval_pairs(records: list[dict], tokenizer, cfg: dict[str, Any]) -> tuple[list, list[str]]:
    """The held-out pairs (every objective is measured on pairs); the first eval_examples where set."""
    from ftq.data.tokenize import tokenize_preference

    pairs = [r for r in records if "chosen" in r]
    if cfg["eval_examples"]:
        pairs = pairs[: cfg["eval_examples"]]
    rows = [(tokenize_preference(tokenizer, r, cfg["max_length"], cfg["truncation"]), r["id"]) for r in pairs]
    rows = [(t, i) for t, i in rows if t is not None]
    return [t for t, _ in rows], [i for _, i in rows]


def answer_logps(model, pairs: list, batch_size: int = 8) -> list[tuple[float, float]]:
    """Summed log-probability of each pair's chosen and rejected answer given its prompt. The LM head runs
    only at the positions that predict an answer token (`logits_to_keep`), so the vocabulary-wide logits
    span the answers, not the prompts: whole-sequence logits were this stage's memory peak on a 1B model."""
    import torch

    device = next(model.parameters()).device
    sequences = [(p.prompt_ids, p.answers[side]) for p in pairs for side in ("chosen", "rejected")]
    sums = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            width = max(len(a) + len(b) for a, b in batch)
            first = min(len(prompt) for prompt, _ in batch) - 1  # the first position predicting an answer token
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (prompt, completion) in enumerate(batch):
                ids[row, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
                mask[row, :len(prompt) + len(completion)] = 1
            kept = torch.arange(first, width - 1, device=device)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=kept).logits
            for row, (prompt, completion) in enumerate(batch):
                at = slice(len(prompt) - 1 - first, len(prompt) - 1 - first + len(completion))
                scores = logits[row, at].float()  # one row's answer in float32 at a time
                targets = torch.tensor(completion, device=device)
                logp = scores.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)
                sums.append(float(logp.sum()))
            del logits
    return [(sums[i], sums[i + 1]) for i in range(0, len(sums), 2)]


def _drop_optimizer_state(trainer) -> None:
    """Adam's moments (twice the trained weights) are not needed once the last step is taken: freed before
    the held-out scoring, so its forward does not add to them."""
    from ftq.memory import release

    if trainer.optimizer is not None:
        trainer.optimizer.state.clear()
    release()


def _tune(cfg, train, root, records, tracked, resume, expected) -> PreferenceResult:
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from ftq.evaluation import preference as scoring
    from ftq.hf import stored_dtype
    from ftq.memory import peak_memory, release
    from ftq.training import preference
    from ftq.training.callbacks import History, Progress
    from ftq.training.model import load_for_training, precision_flags

    started = time.time()
    preference.bound_fused_lm_head(torch.cuda.is_available())
    objective, kto = cfg["objective"], cfg["objective"] == "kto"
    flags = precision_flags(train.precision, stored_dtype(root / "models" / "base"))
    set_seed(cfg["seed"])
    start_dir = root / ("models/base" if cfg["start_from"] == "base" or train.method != "full" else train.output_dir)
    adapter = root / train.output_dir if cfg["start_from"] == "sft" and train.method != "full" else None
    model, tokenizer, load_facts = load_for_training(train, start_dir, flags, adapter=adapter)
    tokens, labels, _ = tokenized(records["train"], tokenizer, cfg, kto)
    rows = preference.kto_rows(tokens, labels) if kto else preference.pair_rows(tokens)
    held_out, held_out_ids = eval_pairs(records["eval"], tokenizer, cfg)
    reference = _reference_logps(model, held_out, objective, resume, root / cfg["checkpoint_dir"])
    history = History(on_log=tracked.log_metrics if tracked else None, extra_prefixes=CURVES)
    trainer_class, args = preference.trainer_and_config(objective, cfg, _arguments(cfg, root, flags, train.gradient_checkpointing))
    trainer = trainer_class(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_dict(rows),
                            callbacks=[history, Progress(history)])
    _quiet(trainer)
    if cfg["start_from"] == "base" and "ref" in getattr(trainer.model, "peft_config", {}):
        # TRL copies any adapter it is given as the frozen reference; a fresh one's copy is the base itself,
        # so the reference is the policy with its adapter disabled (TRL's path without a "ref" adapter):
        # no second adapter, one LoRA forward less per step
        trainer.model.delete_adapter("ref")
    trainer.add_callback(checkpoints_without_reference())
    outcome = trainer.train(resume_from_checkpoint=resume)
    _drop_optimizer_state(trainer)
    tuned = answer_logps(trainer.model, held_out)
    pair_scores = scoring.pair_rows(held_out_ids, reference, tuned, cfg["beta"])
    curve = curve_rows(trainer.state.log_history)  # with a resumed run's earlier steps, from its checkpoint
    report = {
        "objective": objective, "start_from": cfg["start_from"], "method": train.method,
        "train_records": len(rows["prompt_ids"]), "steps": trainer.state.global_step,
        "first_loss": curve[0]["loss"] if curve else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "mean_loss": outcome.training_loss,
        "train_step_seconds": round(history.train_seconds, 2),
        "train_runtime_seconds": round(outcome.metrics.get("train_runtime", 0.0), 2),  # the Trainer's own clock
        "wall_seconds": round(time.time() - started, 2),
        "precision": "bf16" if args.bf16 else "fp32", "load": load_facts,
        "resumed_from_step": int(resume.rsplit("-", 1)[-1]) if resume else None,
        "held_out": scoring.summary(pair_scores) if pair_scores else None,
        **peak_memory(on_gpu=torch.cuda.is_available()),
    }
    target = _save(trainer, tokenizer, cfg, root, {"settings": cfg, "fingerprint": expected, "report": report},
                   zip(held_out_ids, held_out, reference))
    del trainer, model
    release()
    report = stamp(report)
    _write_reports(root, report, pair_scores, curve)
    _log_to_mlflow(tracked, report, curve, root, target, train.method)
    if not cfg["keep_checkpoints"]:
        shutil.rmtree(root / cfg["checkpoint_dir"], ignore_errors=True)
    held = report["held_out"] or {}
    log.info("%s: %d steps, loss %s -> %s; held-out pref_accuracy %s", objective, report["steps"], report["first_loss"],
             report["final_loss"], held.get("pref_accuracy"))
    return PreferenceResult(target, report)


def checkpoints_without_reference():
    """A callback: checkpoints hold the trained adapter only. PEFT saves TRL's frozen `ref` adapter in a
    subfolder, and transformers' resume, finding adapter subfolders, loads those alone: the trained adapter
    stayed as it was at the start, so a resumed policy was its own reference (rewards 0 from the first
    resumed step). Without the subfolder the trained adapter is loaded, and `ref` stays TRL's copy from init."""
    from transformers import TrainerCallback

    class CheckpointsWithoutReference(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for config in folder.glob("*/adapter_config.json"):
                shutil.rmtree(config.parent)

    return CheckpointsWithoutReference()


def curve_rows(log_history: list[dict]) -> list[dict]:
    """The training logs (loss, learning rate, TRL's reward curves), one row per logged step."""
    keep = ("loss", "learning_rate", "grad_norm")
    return [{"step": e["step"], **{k: v for k, v in e.items() if k in keep or k.startswith(CURVES)}}
            for e in log_history if "loss" in e]


def _reference_logps(model, held_out: list, objective: str, resume: str | None, checkpoints: Path):
    """The starting model's held-out log-probs, before any step (saved beside the checkpoints, so a
    resumed run scores against the same starting point rather than a half-trained one)."""
    saved = checkpoints / REFERENCE_LOGPS
    if resume and saved.exists():
        return [tuple(json.loads(line)["logps"]) for line in saved.read_text().splitlines()]
    values = answer_logps(model, held_out)
    model.train()
    atomic_write_text(saved, "".join(json.dumps({"logps": list(v)}) + "\n" for v in values))
    return values


def _arguments(cfg: dict[str, Any], root: Path, flags: dict[str, bool], gradient_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments' names, shared by every objective's TRL config (train.gradient_checkpointing's
    choice: a model that needed it for SFT needs it here too)."""
    import torch

    return {
        "output_dir": str(root / cfg["checkpoint_dir"]), "learning_rate": cfg["learning_rate"],
        "lr_scheduler_type": cfg["lr_scheduler"], "warmup_steps": cfg["warmup"],
        "num_train_epochs": cfg["epochs"], "max_steps": cfg["max_steps"] if cfg["max_steps"] > 0 else -1,
        "per_device_train_batch_size": cfg["per_device_batch_size"],
        "gradient_accumulation_steps": cfg["gradient_accumulation"],
        "seed": cfg["seed"], "data_seed": cfg["seed"], "bf16": flags["bf16"], "fp16": flags["fp16"],
        "use_cpu": not torch.cuda.is_available(), "logging_steps": cfg["logging_steps"],
        # real (unpadded) tokens, both answers of each pair with their prompt: the progress bar's tok/s
        "include_num_input_tokens_seen": "non_padding",
        "save_strategy": "steps", "save_steps": cfg["save_steps"], "save_total_limit": cfg["save_total_limit"],
        "eval_strategy": "no", "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0,
        "gradient_checkpointing": gradient_checkpointing,  # ORPO's and CPO's configs would default to it on
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if gradient_checkpointing else None,
    }


def _quiet(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


def _save(trainer, tokenizer, cfg, root: Path, info: dict, reference) -> Path:
    target = root / cfg["output_dir"]
    with atomic_dir(target) as tmp:
        if hasattr(trainer.model, "peft_config"):  # only the trained adapter: not TRL's frozen "ref" copy
            trainer.model.save_pretrained(str(tmp), selected_adapters=["default"])
        else:
            trainer.save_model(str(tmp))
            (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
        atomic_write_text(tmp / REFERENCE_LOGPS, "".join(json.dumps(
            {"id": i, "prompt_ids": t.prompt_ids, "chosen_ids": t.answers["chosen"], "rejected_ids": t.answers["rejected"],
             "logp_chosen": c, "logp_rejected": r}) + "\n" for i, t, (c, r) in reference))
    return target


def _write_reports(root: Path, report: dict, pair_scores: list[dict], curve: list[dict]) -> None:
    from ftq.io import write_csv

    atomic_write_json(root / REPORT, report)
    atomic_write_text(root / PAIRS, "".join(json.dumps(r) + "\n" for r in pair_scores))
    write_csv(root / LOG_CSV, curve, CSV_COLUMNS)


def _log_to_mlflow(tracked, report: dict, curve: list[dict], root: Path, target: Path, method: str) -> None:
    if tracked is None:
        return
    resumed = report["resumed_from_step"]
    for key in {k for row in curve for k in row} - {"step"} if resumed else ():
        # steps up to the checkpoint were logged by the killed run: copied, so this run has the whole curve
        points = [(r["step"], r[key]) for r in curve if r["step"] <= resumed and key in r]
        if points:
            tracked.log_metric_series(key, points)
    held = report["held_out"] or {}
    metrics = {f"final_{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in ("pref_accuracy", "reward_margin", "logp_accuracy", "reference_logp_accuracy"):
        if key in held:
            metrics[f"heldout_{key}"] = held[key]["mean"]
            metrics[f"heldout_{key}_low"], metrics[f"heldout_{key}_high"] = held[key]["interval"]
    tracked.log_metrics(metrics, step=report["steps"])
    tracked.set_tags({"preference.objective": report["objective"], "preference.start_from": report["start_from"]})
    for path in (REPORT, PAIRS, LOG_CSV):
        tracked.log_artifact(root / path)
    if method == "full":
        tracked.set_tags({"preference.output": str(target)})  # a pointer: full weights are versioned by DVC
    else:
        tracked.log_artifact(target, "adapter")
