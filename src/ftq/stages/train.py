"""Stage `train`: full, LoRA or QLoRA fine-tuning of models/base on data/processed, with the
Hugging Face Trainer (which also drives DDP and DeepSpeed ZeRO).

Outputs:
  models/adapter/ (lora, qlora)   PEFT adapter + tokenizer + ftq_train.json
  models/full/    (full)          whole model + tokenizer + ftq_train.json
  reports/train.json              final losses, steps, real tokens/s, peak memory, wall time
  reports/train_loss.csv          step-wise train loss (a DVC plot); reports/eval_loss.csv likewise
  reports/train_loss.png          loss curves

Checkpoints go to train.checkpoint_dir (models/checkpoints/train), which is not a DVC output, so DVC
does not delete them before rerunning the stage: a killed run resumes from its last checkpoint on the
next `dvc repro`. A fingerprint of the params, data and base model guards against resuming a
different run's checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ftq.io import atomic_write_json, atomic_write_text, save_figure, write_csv
from ftq.memory import peak_memory, release
from ftq.params import params_hash, repo_root
from ftq.provenance import machine, stamp
from ftq.training import launch
from ftq.training.checkpoints import prepare_checkpoints
from ftq.training.settings import TrainSettings

log = logging.getLogger(__name__)

REPORT = Path("reports/train.json")
LOSS_CSV = Path("reports/train_loss.csv")
EVAL_CSV = Path("reports/eval_loss.csv")
LOSS_PNG = Path("reports/train_loss.png")
INFO_FILE = "ftq_train.json"


@dataclass
class TrainResult:
    output_dir: Path
    report: dict[str, Any]


def fingerprint(settings: TrainSettings, params: dict[str, Any], root: Path) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the train params, the precision `auto` resolves to on
    this machine (a bf16 run is not continued in fp32), the data and the base weights."""
    from ftq.hf import stored_dtype
    from ftq.training.model import precision_flags

    base_info = json.loads((root / "models" / "base" / "base.json").read_text())
    manifest = json.loads((root / "data" / "processed" / "manifest.json").read_text())
    return {
        "train": params_hash(asdict(settings)),
        "precision": params_hash(precision_flags(settings.precision, stored_dtype(root / "models" / "base"))),
        "data_md5": manifest.get("md5", ""),
        "base": params_hash({k: v["sha256"] for k, v in base_info["files"].items()}),
    }


def training_arguments(settings: TrainSettings, checkpoint_dir: Path, flags: dict[str, bool], packing: bool, has_eval: bool):
    from transformers import TrainingArguments

    use_cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps > 0 else -1,
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim=settings.optim,
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=flags["bf16"],
        fp16=flags["fp16"],
        use_cpu=not use_cuda,
        ddp_backend="gloo" if launch.in_worker() and not use_cuda else None,
        deepspeed=settings.deepspeed_config(),
        train_sampling_strategy="group_by_length" if settings.group_by_length and not packing else "random",
        length_column_name="length",
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if has_eval and settings.eval_steps > 0 else "no",
        eval_steps=settings.eval_steps if settings.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,  # our Progress callback draws the bar
        dataloader_num_workers=0,
    )
    launch.one_gpu_per_process(args)  # never nn.DataParallel over every visible GPU
    return args


def load_splits(root: Path):
    from datasets import load_from_disk

    processed = root / "data" / "processed"
    if not (processed / "train").exists():
        raise FileNotFoundError(f"{processed}/train: no prepared data; run `dvc repro prepare` first")
    train = load_from_disk(str(processed / "train"))
    evaluation = load_from_disk(str(processed / "eval")) if (processed / "eval").exists() else None
    return train, evaluation if evaluation is not None and len(evaluation) else None


def loss_rows(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [
        {k: e[k] for k in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second") if k in e}
        for e in log_history if "loss" in e
    ]
    evaluation = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return train, evaluation


def plot_losses(train_rows: list[dict], eval_rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", linewidth=1)
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def build_trainer(settings, params, root, tracked):
    from transformers import Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ftq.data.collate import make_collator, takes_label_positions
    from ftq.training.callbacks import History, Progress
    from ftq.hf import stored_dtype
    from ftq.training.model import load_for_training, precision_flags

    base_dir = root / "models" / "base"
    flags = precision_flags(settings.precision, stored_dtype(base_dir))
    packing = settings.packing
    train_data, eval_data = load_splits(root)
    # the arguments first: they carry the DeepSpeed config, and under ZeRO-3 its presence is what makes
    # from_pretrained build the model partitioned across ranks instead of whole on every rank
    args = training_arguments(settings, root / settings.checkpoint_dir, flags, packing, eval_data is not None)
    # seed before the adapter is created: LoRA's initial weights come from the global RNG
    set_seed(settings.seed)
    model, tokenizer, load_facts = load_for_training(settings, base_dir, flags)
    history = History(on_log=tracked.log_metrics if tracked else None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        # no processing_class: with it, packed rows would count <|im_end|> (the pad id) as padding
        data_collator=make_collator(tokenizer.pad_token_id, packing, takes_label_positions(model)),
        callbacks=[history, Progress(history)],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer, tokenizer, history, packing, load_facts


def save_output(trainer, tokenizer, settings: TrainSettings, root: Path, info: dict[str, Any]) -> Path:
    """Every rank takes part in save_model (ZeRO-3 gathers shards); rank 0 renames the result into place."""
    target = root / settings.output_dir
    staging = target.with_name(f"{target.name}.tmp-train")
    if launch.is_main_process() and staging.exists():
        shutil.rmtree(staging)
    try:
        trainer.save_model(str(staging))
        if launch.is_main_process():
            (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; ftq_train.json has the settings
            tokenizer.save_pretrained(staging)
            atomic_write_json(staging / INFO_FILE, info)
            for path in staging.iterdir():
                path.chmod(0o644)  # safetensors writes 0600 files
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    except BaseException:  # a failure or a stop (Ctrl-C, SIGTERM): no half-saved adapter stays behind
        if launch.is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def run(params: dict[str, Any], argv: list[str] | None = None) -> TrainResult | None:
    """Train; returns None in non-main worker processes (only rank 0 writes outputs and MLflow)."""
    from ftq.tracking import stage_run

    settings = TrainSettings.from_params(params)
    if launch.needs_launcher(settings):
        code = launch.launch(settings, argv or ["train"])
        if code != 0:
            raise SystemExit(code)
        return None
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if launch.in_worker():
        launch.start_worker(bool(settings.deepspeed))  # before any collective (the resume broadcast below is one)
    root = repo_root()
    main = launch.is_main_process()
    expected = fingerprint(settings, params, root)
    resume = prepare_checkpoints(root / settings.checkpoint_dir, expected) if main else None
    if launch.in_worker():
        resume = _broadcast_resume(resume)
    tracking = stage_run("train", params) if main else contextlib.nullcontext(None)
    try:
        with tracking as tracked:
            result = _train(settings, params, root, tracked, resume, expected)
        log.info("rank %s of %d finished", os.environ.get("RANK", "0"), settings.world_size)
    finally:
        launch.finish()
    return result


def _broadcast_resume(resume: str | None) -> str | None:
    import torch.distributed as dist

    box = [resume]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train(settings, params, root, tracked, resume, expected) -> TrainResult | None:
    started = time.time()
    trainer, tokenizer, history, packing, load_facts = build_trainer(settings, params, root, tracked)
    if tracked:
        trainable, total = _parameter_counts(trainer.model)
        tracked.set_tags({"train.method": settings.method, "train.resumed_from": resume or ""})
        tracked.log_metrics({"trainable_parameters": trainable, "total_parameters": total})
    tokens_before = _tokens_at(resume)  # read now: save_total_limit may rotate that checkpoint away
    # DeepSpeed (below ZeRO-3) cannot evaluate before its engine exists: no baseline there
    if trainer.eval_dataset is not None and not resume and not settings.deepspeed:
        # the eval loss before any training: the baseline the curve falls from. train() starts a new
        # TrainerState, so History puts it back into log_history (and so into every checkpoint).
        with _rng_preserved():  # a resumed run skips this evaluation, so it must not shift any RNG stream
            history.initial_eval_loss = trainer.evaluate()["eval_loss"]
    outcome = trainer.train(resume_from_checkpoint=resume)
    eval_loss = _final_eval_loss(trainer)
    wall = time.time() - started
    train_rows, eval_rows = loss_rows(trainer.state.log_history)
    # seconds of training steps (not a runtime, ftq.runtimes: HF names this duration train_runtime)
    step_seconds = history.train_seconds or outcome.metrics.get("train_runtime") or wall
    tokens_this_run = trainer.state.num_input_tokens_seen - tokens_before
    report = {
        "method": settings.method,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 4),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "first_train_loss": train_rows[0]["loss"] if train_rows else None,
        "mean_train_loss": outcome.training_loss,
        # batches differ in kind and length, so single steps are noisy: compare the first and last tenth
        "train_loss_first_tenth": _mean_loss(train_rows[: max(len(train_rows) // 10, 1)]),
        "train_loss_last_tenth": _mean_loss(train_rows[-max(len(train_rows) // 10, 1) :]),
        "initial_eval_loss": eval_rows[0]["eval_loss"] if eval_rows and eval_rows[0]["step"] == 0 else None,
        "eval_loss": eval_loss,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "real_tokens_per_second": round(tokens_this_run / step_seconds, 2) if step_seconds else None,
        "train_step_seconds": round(step_seconds, 2),
        "train_runtime_seconds": round(outcome.metrics.get("train_runtime", wall), 2),  # Trainer's own clock
        "wall_seconds": round(wall, 2),
        **peak_memory(on_gpu=torch.cuda.is_available()),
        "world_size": settings.world_size,
        "packing": packing,
        "optim": settings.optim,
        # what `auto` chose here, as the Trainer ran it
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "cpu": machine()["cpu"],  # what that precision ran on (bf16 is native on some CPUs, emulated on others)
        "load": load_facts,
        "resumed_from_step": _step_of(resume),
    }
    info = {"method": settings.method, "settings": asdict(settings), "fingerprint": expected, "report": report}
    target = save_output(trainer, tokenizer, settings, root, info)
    examples = len(trainer.train_dataset)
    # the weights are saved: free them before plotting and logging, which would otherwise add to the peak
    del trainer
    release()
    if not launch.is_main_process():
        return None
    report = stamp(report)
    atomic_write_json(root / REPORT, report)
    write_csv(root / LOSS_CSV, train_rows, ["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"])
    write_csv(root / EVAL_CSV, eval_rows, ["step", "eval_loss"])
    plot_losses(train_rows, eval_rows, root / LOSS_PNG, f"{settings.method} on {examples} examples")
    _log_to_mlflow(tracked, report, train_rows + eval_rows, resume, root, target)
    if not settings.keep_checkpoints:
        shutil.rmtree(root / settings.checkpoint_dir, ignore_errors=True)
    log.info("trained %d steps: train loss %.4f -> %.4f (first/last tenth), eval loss %s -> %s; wrote %s",
             report["steps"], report["train_loss_first_tenth"] or 0, report["train_loss_last_tenth"] or 0,
             report["initial_eval_loss"], eval_loss, target)
    return TrainResult(target, report)


def _log_to_mlflow(tracked, report, rows, resume, root, target) -> None:
    if tracked is None:
        return
    resumed_step = _step_of(resume)
    # steps up to a resumed checkpoint were logged by the killed run: copy them so this run has the whole curve
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss"):
        if resumed_step is None:
            break
        points = [(r["step"], r[key]) for r in rows if r["step"] <= resumed_step and key in r]
        if points:
            tracked.log_metric_series(key, points)
    summary = {k if k.startswith(("final_", "first_", "mean_")) else f"final_{k}": v for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracked.log_metrics(summary, step=report["steps"])
    for path in (REPORT, LOSS_CSV, EVAL_CSV, LOSS_PNG):
        tracked.log_artifact(root / path)
    if report["method"] == "full":
        tracked.set_tags({"train.output": str(target)})  # a pointer: full weights are versioned by DVC
    else:
        tracked.log_artifact(target, "adapter")


@contextlib.contextmanager
def _rng_preserved():
    """Every DataLoader iterator draws a seed from torch's global RNG: restore all RNG states after."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _mean_loss(rows: list[dict]) -> float | None:
    return round(sum(r["loss"] for r in rows) / len(rows), 6) if rows else None


def _final_eval_loss(trainer) -> float | None:
    """The eval loss at the last step: the scheduled evaluation's if one ran there, else a new one."""
    if trainer.eval_dataset is None:
        return None
    last = [e for e in trainer.state.log_history if "eval_loss" in e]
    if last and last[-1]["step"] == trainer.state.global_step:
        return last[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _parameter_counts(model) -> tuple[int, int]:
    from ftq.training.model import parameter_counts

    return parameter_counts(model)


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def _tokens_at(checkpoint: str | None) -> int:
    if not checkpoint:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


def main_argv() -> list[str]:
    """The ftq arguments of this process, to hand on to the launched workers."""
    args = sys.argv[1:]
    return args if args and args[0] == "train" else ["train", *args]
