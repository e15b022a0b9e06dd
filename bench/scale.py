"""Simulated scale on CPU: the whole chain on a >= 1B-parameter model, with each stage's peak memory.

A random-initialised model of a real architecture (TinyLlama-1.1B's Llama shape, bf16, with the
embedded SmolLM2 tokenizer; built from a config, nothing downloaded) runs base -> prepare (small data)
-> train (LoRA, a few steps) -> preference (DPO on the SFT adapter, two steps) -> merge -> reference -> imatrix
-> quantize (q4_k_m, with the importance matrix) -> evaluate (merged and q4_k_m,
small) in a temporary project, each stage as its own process, as `dvc repro` runs it (`bin/ftq STAGE`).
The 135M embedded model (float32) runs the same chain, so the growth is visible.

Peak memory of a stage is the larger of (a) the process tree's summed resident set, sampled every 50 ms,
and (b) the kernel's maximum resident set of the stage process and its waited-for children (wait4), so a
spike between samples is not missed. Resident set counts mapped file pages too (safetensors are read
through mmap), the strict reading. The goal: no stage above 1.6x the model's bytes (its safetensors).

    .venv/bin/python bench/scale.py                     # every row, writes reports/bench/scale.json
    .venv/bin/python bench/scale.py --only llama-1.1b   # one row (the others are kept from the JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "reports" / "bench" / "scale.json"
CACHE = Path(os.environ.get("FTQ_CACHE", Path.home() / ".cache" / "ftq")) / "scale"
GOAL = 1.6
# TinyLlama-1.1B's shape (Llama 2 architecture, grouped-query attention) with SmolLM2's 49,152 tokens
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
# A Qwen2 shape stops at quantize: llama.cpp's Qwen2 converter recognises a BPE pre-tokenizer only by a
# hash of its output, which SmolLM2's tokenizer (rebuilt from GGUF) does not match; Llama's has a fallback
MODELS = {"llama-1.1b": ("llama", LLAMA_1B)}
STAGES = [("base", ["base", "run"]), ("prepare", ["prepare"]), ("train", ["train"]), ("preference", ["preference"]),
          ("merge", ["merge"]),
          ("reference", ["reference"]), ("imatrix", ["imatrix"]), ("quantize", ["quantize", "q4_k_m"]),
          ("benchmark_data", ["benchmark-data"]), ("evaluate_merged", ["evaluate", "merged"]),
          ("evaluate_q4_k_m", ["evaluate", "q4_k_m"])]
# small work, the same code paths as the demo
PARAMS = {
    "data": {"datasets": ["scale_train", "scale_heldout"], "max_length": 256},
    # gradient checkpointing, as on any model that has to fit: activations then cost a layer, not the stack
    "train": {"max_steps": 3, "per_device_batch_size": 1, "gradient_accumulation": 2, "eval_steps": 0, "save_steps": 100, "warmup": 0,
              "gradient_checkpointing": True,
              "logging_steps": 1},
    # DPO on the SFT adapter (TRL's frozen `ref` copy of it is the reference), then merged like SFT
    "preference": {"objective": "dpo", "datasets": ["scale_pairs"], "eval_datasets": ["scale_pairs_heldout"],
                   "max_steps": 2, "per_device_batch_size": 1, "gradient_accumulation": 2, "max_length": 256,
                   "save_steps": 100, "warmup": 0},
    "merge": {"check": {"examples": 2, "max_length": 128}},
    "quantize": {"enabled": ["q4_k_m"], "reference": {"examples": 4, "max_length": 128},
                 "imatrix": {"samples": 16, "max_length": 256, "chunk_size": 256},
                 "check": {"max_new_tokens": 8}},
    "evaluate": {"task_examples": 2, "max_new_tokens": 8, "perplexity_examples": 2, "perplexity_max_length": 128,
                 "speed_prompts": ["Who are you?"], "speed_max_new_tokens": 8, "speed_repeats": 1,
                 "general": {"max_new_tokens": 8, "questions": [{"prompt": "What is the capital of France?",
                                                                 "expect": ["Paris"]}]},
                 "lm_eval": {"tasks": [], "limit": 2}},
}
DATASETS = {
    "scale_train": {"file": "raw/ftq_default/train.json", "format": "alpaca", "num_samples": 16, "split": "train"},
    "scale_heldout": {"file": "raw/ftq_default/heldout.json", "format": "alpaca", "num_samples": 8, "split": "eval"},
    "scale_pairs": {"file": "raw/ftq_default/preference.json", "format": "alpaca", "ranking": True, "num_samples": 8,
                    "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "scale_pairs_heldout": {"file": "raw/ftq_default/preference_heldout.json", "format": "alpaca", "ranking": True,
                            "num_samples": 4, "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                                          "rejected": "rejected"}},
}


def embedded_tokenizer():
    """SmolLM2's tokenizer from the embedded GGUF, with ftq's base-stage fixes (eos, pad, template)."""
    from ftq.stages.base import fix_special_tokens, load_source, resolve_source

    model, tokenizer = load_source(resolve_source("embedded"))
    fix_special_tokens(model, tokenizer)
    return tokenizer


def build_model(folder: Path, name: str) -> Path:
    """A random-initialised bf16 model saved as an HF folder (cached: the same seed gives the same bytes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    tokenizer = embedded_tokenizer()
    model_type, shape = MODELS[name]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size="1GB")
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def built(name: str) -> str:
    """The model is built in a child process: this one must stay small, because Linux carries a process's
    peak resident set across fork and exec into every stage it starts (wait4 would report it)."""
    folder = CACHE / f"{name}-random-bf16"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--build", name], check=True)
    return str(folder)


def make_project(root: Path, source: str) -> Path:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "bin", root / "bin")
    shutil.copytree(REPO / "data" / "raw", root / "data" / "raw")
    (root / "data" / "datasets.yaml").write_text(yaml.safe_dump(DATASETS, sort_keys=False))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["source"] = source
    for block, values in PARAMS.items():
        merge(params[block], values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def merge(target: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict) and key != "general":
            merge(target[key], value)
        else:
            target[key] = value


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(root: Path, args: list[str], log_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(FTQ_PYTHON=sys.executable, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(root / "bin" / "ftq"), *args], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        sampled = [0]
        done = threading.Event()

        def sample() -> None:
            handle = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    sampled[0] = max(sampled[0], tree_rss(handle))
                except psutil.Error:
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"stage {args} failed ({proc.returncode}); log: {log_path}\n{log_path.read_text()[-3000:]}")
    return {"wall_seconds": round(time.time() - started, 1), "peak_memory_bytes": max(sampled[0], usage.ru_maxrss * 1024),
            "sampled_tree_rss_bytes": sampled[0], "max_rss_bytes": usage.ru_maxrss * 1024}


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_row(name: str, source: str, logs: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"ftq-scale-{name}-") as tmp:
        root = make_project(Path(tmp), source)
        stages = {}
        for stage, args in STAGES:
            stages[stage] = run_stage(root, args, logs / f"{name}.{stage}.log")
            print(f"{name} {stage}: {stages[stage]['wall_seconds']} s, peak {stages[stage]['peak_memory_bytes'] / 1e9:.2f} GB",
                  flush=True)
            if stage == "base":
                base = json.loads((root / "models" / "base" / "base.json").read_text())
                size = model_bytes(root / "models" / "base")
        reported = {s: json.loads((root / "reports" / f).read_text()).get("peak_memory_bytes") for s, f in
                    (("train", "train.json"), ("merge", "merge.json"), ("evaluate_merged", "eval/merged.json"),
                     ("evaluate_q4_k_m", "eval/builds/q4_k_m.json"), ("preference", "preference.json"))}
    for stage, values in stages.items():
        values["x_model_bytes"] = round(values["peak_memory_bytes"] / size, 2)
        if reported.get(stage) is not None:
            values["stage_reported_peak_memory_bytes"] = reported[stage]
    worst = max(stages, key=lambda s: stages[s]["x_model_bytes"])
    return {"name": name, "architecture": base["architecture"], "parameters": base["num_parameters"],
            "dtype": base["dtype"], "model_bytes": size, "stages": stages, "worst_stage": worst,
            "worst_x_model_bytes": stages[worst]["x_model_bytes"], "meets_goal": stages[worst]["x_model_bytes"] <= GOAL}


def marginal(rows: list[dict]) -> dict:
    """Each stage's extra peak per extra model byte, between the smallest and the largest model: the
    copies a stage makes, without the fixed runtime share (imports, buffers) that both rows pay."""
    if len(rows) < 2:
        return {}
    small, large = min(rows, key=lambda r: r["model_bytes"]), max(rows, key=lambda r: r["model_bytes"])
    extra = large["model_bytes"] - small["model_bytes"]
    return {"between": [small["name"], large["name"]],
            "stages": {s: round((large["stages"][s]["peak_memory_bytes"] - small["stages"][s]["peak_memory_bytes"])
                                / extra, 2) for s in large["stages"] if s in small["stages"]}}


def table(report: dict) -> str:
    """docs/benchmarks.md's table: each stage's peak as a multiple of the model's bytes (and in GB)."""
    stages = [s for s, _ in STAGES]
    lines = ["| stage | " + " | ".join(f"{r['name']} ({r['dtype']}, {r['model_bytes'] / 1e9:.2f} GB)" for r in report["results"])
             + " | extra peak per extra model byte |", "|---|" + "---|" * (len(report["results"]) + 1)]
    marginal_stages = (report.get("marginal") or {}).get("stages", {})
    for stage in stages:
        cells = []
        for row in report["results"]:
            values = row["stages"].get(stage)
            cells.append(f"{values['x_model_bytes']:.2f}x ({values['peak_memory_bytes'] / 1e9:.2f} GB)" if values else "–")
        extra = marginal_stages.get(stage)
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {'–' if extra is None else f'{abs(extra):.2f}' if abs(extra) < 0.005 else f'{extra:.2f}'} |")
    lines += ["", f"Goal: {report['goal']}. " + "; ".join(
        f"{r['name']}: worst {r['worst_stage']} {r['worst_x_model_bytes']:.2f}x, goal {'met' if r['meets_goal'] else 'not met'}"
        for r in report["results"]) + f". Peak: {report['measured']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["smollm2-135m", *MODELS])
    parser.add_argument("--table", action="store_true", help="print docs/benchmarks.md's table from the committed report")
    parser.add_argument("--build", choices=list(MODELS), help=argparse.SUPPRESS)  # the child that builds a model
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return
    if args.build:
        build_model(CACHE / f"{args.build}-random-bf16", args.build)
        return
    logs = Path(tempfile.gettempdir()) / "ftq-scale-logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = {"smollm2-135m": lambda: "embedded", **{name: (lambda n=name: built(n)) for name in MODELS}}
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    results = {r["name"]: r for r in previous.get("results", [])}
    for name, source in rows.items():
        if args.only and name != args.only:
            continue
        results[name] = run_row(name, source(), logs)
    report = {
        "marginal": marginal(list(results.values())),
        "goal": f"every stage's peak resident memory <= {GOAL}x the model's bytes (its safetensors)",
        "machine": {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total},
        "measured": "max(process tree RSS sampled every 50 ms, wait4 max RSS of the stage process and children)",
        "params": PARAMS,
        "results": list(results.values()),
    }
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(OUT, stamp(report, script=__file__))
    if report["marginal"]:
        print("extra peak per extra model byte:", report["marginal"]["stages"])
    for row in report["results"]:
        print(f"{row['name']}: {row['parameters']:,} parameters, {row['model_bytes'] / 1e9:.2f} GB; worst "
              f"{row['worst_stage']} {row['worst_x_model_bytes']}x (goal {GOAL}x: {'met' if row['meets_goal'] else 'NOT met'})")


if __name__ == "__main__":
    main()
