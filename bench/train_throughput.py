"""Training throughput: ftq against LLaMA-Factory on the same model, data and settings, in one run.

For each model and method, both tools train one epoch from the same base folder on the same Alpaca
records, with the same batch size, sequence cap, LoRA config, learning rate, schedule, seed and thread
count, and on the same token stream: every record carries SmolLM2's default system prompt explicitly,
so ftq's chat template and LLaMA-Factory's `smollm2` template render the same text (real-token counts
are asserted equal within 0.5 %). ftq runs its defaults (group_by_length) and its packing;
LLaMA-Factory runs its defaults and its own packing (neat_packing: examples isolated, as ftq's are).
Every system runs `--repeats` times (default 3), interleaved, and each repeat compares ftq with the
best LLaMA-Factory setting (by median) measured in the same repeat; the report gives medians, spreads
and the median of those paired ratios. Real tokens/s counts only non-padding tokens, over the
Trainer's train_runtime. LLaMA-Factory (`llamafactory` from PyPI) runs in its own virtualenv, made here
on first use (bench/.venv-llamafactory). Results: reports/bench/train.json.

    env -u OMP_WAIT_POLICY .venv/bin/python bench/train_throughput.py   # ~25 min on 2 CPU cores (LoRA rows)
    .venv/bin/python bench/train_throughput.py --methods lora,full       # full fine-tuning too
    .venv/bin/python bench/train_throughput.py --quick                  # tiny model only
    .venv/bin/python bench/train_throughput.py --models smollm2-135m --precision bf16   # both tools at bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ftq.hf import cpu_multiplies_bf16

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny-model builder the tests use

LF_VENV = REPO / "bench" / ".venv-llamafactory"
# LLaMA-Factory 0.9.5 and the versions it accepts; torchvision/torchaudio/gradio are skipped (--no-deps):
# they serve its multimodal and web UI paths, not text SFT, and PyPI's torchvision breaks beside torch 2.13.
LF_PACKAGES = [
    "torch==2.13.0", "transformers==5.6.0", "peft==0.18.1", "accelerate==1.11.0", "datasets==4.0.0",
    "trl==0.24.0", "tokenizers", "safetensors", "sentencepiece", "tiktoken", "einops", "fire", "omegaconf",
    "pydantic", "pyyaml", "protobuf", "scipy", "matplotlib", "pandas", "numpy", "packaging", "tyro<0.9.0",
    "fastapi", "uvicorn", "sse-starlette", "av<=16.0.0", "torchdata==0.11.0", "jieba", "nltk", "rouge-chinese",
]
LF_VERSION = "llamafactory==0.9.5"
# llamafactory.data.mm_plugin imports torchaudio at module level, for audio inputs only. No torchaudio
# build loads beside torch 2.13 (PyPI stops at 2.11), so text-only runs get an empty placeholder
# package on PYTHONPATH; any audio use would fail loudly. Recorded in the report.
TORCHAUDIO_PLACEHOLDER = REPO / "bench" / ".venv-llamafactory" / "placeholders"


def sh(command, cwd=None, env=None, timeout=3600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def ensure_llamafactory() -> Path:
    python = LF_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llamafactory"], capture_output=True).returncode == 0:
        return python
    print("creating", LF_VENV, file=sys.stderr)
    sh([sys.executable, "-m", "venv", str(LF_VENV)])
    sh([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    sh([str(python), "-m", "pip", "install", "-q", *LF_PACKAGES])
    sh([str(python), "-m", "pip", "install", "-q", "--no-deps", LF_VERSION])
    return python


def torchaudio_placeholder() -> Path:
    package = TORCHAUDIO_PLACEHOLDER / "torchaudio"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        '"""Placeholder: LLaMA-Factory imports torchaudio for audio inputs only; none loads beside torch 2.13."""\n'
        "__version__ = '0+placeholder'\n"
        "def __getattr__(name):\n"
        "    raise ImportError(f'torchaudio.{name}: no torchaudio build for torch 2.13 in this benchmark')\n"
    )
    return TORCHAUDIO_PLACEHOLDER


# what ftq's SmolLM2 chat template adds when a chat has no system message; LLaMA-Factory's `smollm2`
# template adds the same words with a final period, `chatml` adds none: given explicitly, both render it
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def alpaca_data(limit: int) -> tuple[Path, str]:
    """The first `limit` records, each with the system prompt given explicitly (the same text for both
    tools); both train exactly one epoch over them, so both see every record once."""
    shared = Path(os.environ.get("FTQ_SHARED_DATA", REPO.parent / "shared" / "data")) / "sft" / "alpaca_en_demo.json"
    source = shared if shared.exists() else REPO / "data" / "raw" / "ftq_default" / "train.json"
    records = [{**r, "system": SYSTEM_PROMPT} for r in json.loads(source.read_text())[:limit]]
    folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
    (folder / "bench.json").write_text(json.dumps(records))
    return folder / "bench.json", source.name


def tiny_source(folder: Path) -> Path:
    """The tests' tiny LLaMA (2 layers, 64 wide) around the real SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    from conftest import build_tiny_model
    from ftq.stages.base import embedded_gguf, fix_special_tokens

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    class _Config:
        config = LlamaConfig(eos_token_id=2)

    fix_special_tokens(_Config(), tokenizer)
    model = build_tiny_model(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def materialize_base(source: str, folder: Path) -> Path:
    """models/base made by ftq's own base stage in a scratch project, for both tools to train from."""
    project = folder.parent / f"{folder.name}-project"
    project.mkdir(exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump({"base": {"source": source}, "tracking": {"experiment": "bench"}}))
    sh([sys.executable, "-m", "ftq", "base", "run"], cwd=project, env=bench_env())
    shutil.move(str(project / "models" / "base"), folder)
    return folder


def bench_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", FTQ_PYTHON=sys.executable, DISABLE_VERSION_CHECK="1",
               MLFLOW_TRACKING_URI="", WANDB_DISABLED="true")
    env.pop("MLFLOW_TRACKING_URI")
    return env


def run_ftq(base: Path, data: Path, method: str, cfg: dict, mode: str, work: Path) -> dict:
    project = work / f"ftq-{method}-{mode}"
    shutil.rmtree(project, ignore_errors=True)
    (project / "data" / "raw").mkdir(parents=True)
    shutil.copy(data, project / "data" / "raw" / "bench.json")
    (project / "data" / "datasets.yaml").write_text(yaml.safe_dump(
        {"bench": {"file": "raw/bench.json", "format": "alpaca", "columns": {"system": "system"}}}))
    (project / "models").mkdir()
    os.symlink(base, project / "models" / "base")
    params = {
        "data": {"datasets": ["bench"], "eval_size": 0, "max_length": cfg["max_length"],
                 "seed": cfg["seed"]},
        "train": {
            "method": method, "output_dir": "models/full" if method == "full" else "models/adapter",
            "lora": {"rank": cfg["lora_rank"], "alpha": cfg["lora_alpha"], "dropout": 0.0, "target_modules": "all-linear"},
            "learning_rate": cfg["learning_rate"], "lr_scheduler": "cosine", "warmup": 0, "epochs": 1,
            "per_device_batch_size": cfg["batch_size"], "gradient_accumulation": 1, "seed": cfg["seed"],
            "group_by_length": mode == "group_by_length", "packing": mode == "packing", "eval_steps": 0, "save_steps": 10_000,
            "torch_threads": cfg["threads"], "logging_steps": 1, "precision": cfg["precision"],
        },
        "tracking": {"experiment": "bench"},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = bench_env(cfg["threads"])
    sh([sys.executable, "-m", "ftq", "prepare"], cwd=project, env=env)
    sh([sys.executable, "-m", "ftq", "train"], cwd=project, env=env)
    report = json.loads((project / "reports" / "train.json").read_text())
    if report["precision"] != cfg["precision"]:
        raise AssertionError(f"ftq trained at {report['precision']}, asked for {cfg['precision']}")
    losses = [float(line.split(",")[1]) for line in (project / "reports" / "train_loss.csv").read_text().splitlines()[1:]]
    return {
        "real_tokens_per_second": round(report["tokens_seen"] / report["train_runtime_seconds"], 2),
        "real_tokens": report["tokens_seen"],
        "train_seconds": report["train_runtime_seconds"],
        "steps": report["steps"],
        "peak_memory_bytes": report["peak_memory_bytes"],
        "losses": losses,
    }


def run_llamafactory(python: Path, base: Path, data: Path, method: str, cfg: dict, mode: str, work: Path) -> dict:
    folder = work / f"lf-{method}-{mode}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    shutil.copy(data, folder / "data" / "bench.json")
    (folder / "data" / "dataset_info.json").write_text(json.dumps(
        {"bench": {"file_name": "bench.json", "columns": {"prompt": "instruction", "query": "input",
                                                          "response": "output", "system": "system"}}}))
    config = {**lf_config(base, folder, "bench", cfg), "stage": "sft", "finetuning_type": method,
              "include_num_input_tokens_seen": False}
    if method == "lora":
        config.update(lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0, lora_target="all")
    if mode == "packing":  # its own packing, examples isolated (block-diagonal attention), as ftq's packing
        config.update(packing=True, neat_packing=True)
    (folder / "train.yaml").write_text(yaml.safe_dump(config))
    env = bench_env(cfg["threads"])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(torchaudio_placeholder())
    # first call tokenizes and saves the dataset (so its token counts can be read), the second trains from it
    started = time.time()
    sh([str(python), "-m", "llamafactory.cli", "train", str(folder / "train.yaml")], cwd=folder, env=env)
    wall = time.time() - started
    state = json.loads((folder / "out" / "trainer_state.json").read_text())
    results = json.loads((folder / "out" / "train_results.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    real_tokens = count_lf_tokens(python, folder / "tokenized")
    runtime = results["train_runtime"]
    return {
        "real_tokens_per_second": round(real_tokens / runtime, 2),
        "real_tokens": real_tokens,
        "train_seconds": runtime,
        "steps": state["global_step"],
        "wall_seconds": round(wall, 2),
        "losses": losses,
    }


def lf_config(base: Path, folder: Path, dataset: str, cfg: dict) -> dict:
    """LLaMA-Factory's settings every bench here shares: one epoch on CPU (float32, or bf16 where
    cfg["precision"] says: bf16 weights and autocast, its own best bf16 path) from `base` over
    `dataset` (folder/data), the smollm2 template, the tokenized data kept (to count its tokens)."""
    return {
        "model_name_or_path": str(base), "trust_remote_code": False, "do_train": True,
        "dataset": dataset, "dataset_dir": str(folder / "data"), "template": "smollm2",
        "cutoff_len": cfg["max_length"], "overwrite_cache": True, "preprocessing_num_workers": 1,
        "tokenized_path": str(folder / "tokenized"),
        "output_dir": str(folder / "out"), "logging_steps": 1, "save_strategy": "no", "overwrite_output_dir": True,
        "report_to": "none", "plot_loss": False,
        "per_device_train_batch_size": cfg["batch_size"], "gradient_accumulation_steps": 1,
        "learning_rate": cfg["learning_rate"], "lr_scheduler_type": "cosine", "warmup_steps": 0,
        "num_train_epochs": 1, "seed": cfg["seed"], "bf16": cfg["precision"] == "bf16", "fp16": False, "use_cpu": True,
        "dataloader_num_workers": 0,
    }


def count_lf_tokens(python: Path, tokenized: Path) -> int:
    """Non-padding tokens LLaMA-Factory trained on: one epoch, so every tokenized example exactly once
    (packed rows are padded to the cutoff with attention-mask 0 under neat_packing)."""
    code = (
        "import sys; from datasets import load_from_disk; d=load_from_disk(sys.argv[1]);"
        "d=d['train'] if hasattr(d,'keys') else d; print(sum(sum(1 for m in x if m) for x in d['attention_mask']))"
    )
    return int(sh([str(python), "-c", code, str(tokenized)]).stdout.strip())


def loss_summary(losses: list[float]) -> dict:
    third = max(len(losses) // 3, 1)
    return {"first": losses[0], "last": losses[-1], "mean": sum(losses) / len(losses),
            "mean_last_third": sum(losses[-third:]) / third} if losses else {}


CONFIGS = {
    "tiny": {"examples": 400, "batch_size": 4, "methods": ["lora"]},
    "smollm2-135m": {"examples": 24, "batch_size": 4, "methods": ["lora"]},
}
COMMON = {"max_length": 512, "learning_rate": 1e-4, "lora_rank": 16, "lora_alpha": 32, "seed": 42, "threads": 1}
SYSTEMS = ("ftq_group_by_length", "ftq_packing", "llamafactory_default", "llamafactory_packing")
MAX_TOKEN_GAP = 0.005  # real-token counts of the two tools may differ by at most 0.5 %


def run_system(system: str, lf_python: Path, base: Path, data: Path, method: str, cfg: dict, work: Path) -> dict:
    tool, mode = system.split("_", 1)
    if tool == "ftq":
        return run_ftq(base, data, method, cfg, mode, work)
    return run_llamafactory(lf_python, base, data, method, cfg, mode, work)


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians and spreads per system, and ftq's paired ratios against the best LLaMA-Factory setting."""
    row = {}
    for system, repeats in runs.items():
        speeds = [r["real_tokens_per_second"] for r in repeats]
        row[system] = {
            "real_tokens_per_second": round(statistics.median(speeds), 2),
            "real_tokens_per_second_runs": speeds,
            "spread": round((max(speeds) - min(speeds)) / statistics.median(speeds), 3),
            "real_tokens": repeats[0]["real_tokens"],
            "train_seconds_median": round(statistics.median(r["train_seconds"] for r in repeats), 2),
            "steps": repeats[0]["steps"],
            "loss": loss_summary(repeats[0]["losses"]),
        }
    best_lf = max(("llamafactory_default", "llamafactory_packing"), key=lambda s: row[s]["real_tokens_per_second"])
    row["best_llamafactory"] = best_lf
    for system in ("ftq_group_by_length", "ftq_packing"):
        paired = [f["real_tokens_per_second"] / l["real_tokens_per_second"] for f, l in zip(runs[system], runs[best_lf])]
        row[system]["speedup_vs_best_llamafactory"] = round(statistics.median(paired), 3)
        row[system]["speedup_vs_best_llamafactory_runs"] = [round(x, 3) for x in paired]
        row[system]["speedup_ratio_of_medians"] = round(
            row[system]["real_tokens_per_second"] / row[best_lf]["real_tokens_per_second"], 3)
    return row


def assert_equal_work(runs: dict[str, list[dict]], where: str) -> dict:
    counts = {system: {r["real_tokens"] for r in repeats} for system, repeats in runs.items()}
    for system, values in counts.items():
        if len(values) != 1:
            raise AssertionError(f"{where}: {system} trained on different token counts across repeats: {values}")
    flat = {system: next(iter(values)) for system, values in counts.items()}
    low, high = min(flat.values()), max(flat.values())
    gap = (high - low) / high
    if gap > MAX_TOKEN_GAP:
        raise AssertionError(f"{where}: real-token counts differ by {gap:.2%} (> {MAX_TOKEN_GAP:.1%}): {flat}")
    return {"real_tokens": flat, "gap": round(gap, 5)}


SYSTEM_NAMES = {"ftq_group_by_length": "ftq, group_by_length (default)", "ftq_packing": "ftq, packing",
                "llamafactory_default": "LLaMA-Factory, default", "llamafactory_packing": "LLaMA-Factory, neat_packing"}


def table(report: dict) -> str:
    """docs/benchmarks.md's table: every row of the committed report, one line per system."""
    lines = ["| model | method | precision | system | real tokens/s (median) | spread | loss, last third | "
             "speed vs best LLaMA-Factory (median paired) |", "|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        for system in SYSTEMS:
            r = row[system]
            ratio = r.get("speedup_vs_best_llamafactory")
            lines.append(f"| {row['model']} | {row['method']} | {row.get('precision', 'fp32')} | {SYSTEM_NAMES[system]} | "
                         f"{r['real_tokens_per_second']:.0f} | {r['spread']:.0%} | {r['loss']['mean_last_third']:.3f} | "
                         f"{f'{ratio:.2f}x' if ratio else '–'} |")
    machine = report["machine"]
    lines += ["", f"{row['repeats']} repeats per system, interleaved; {machine['threads_per_run']} thread per run on "
              f"{machine['cpu_count']} cores; LLaMA-Factory {report['versions']['llamafactory']} (transformers "
              f"{report['versions']['llamafactory_transformers']}), ftq with transformers "
              f"{report['versions']['ftq_transformers']}. Real tokens per epoch equal within "
              f"{max(r['equal_work']['gap'] for r in report['results']):.2%} in every row."]
    by_key = {row_key(r): r for r in report["results"]}
    for (model, method, precision), row in by_key.items():
        fp32 = by_key.get((model, method, "fp32"))
        if precision == "bf16" and fp32:
            gains = ", ".join(f"{SYSTEM_NAMES[s]} {row[s]['real_tokens_per_second'] / fp32[s]['real_tokens_per_second']:.2f}x"
                              for s in SYSTEMS)
            lines.append(f"bf16 over fp32 ({model}, {method}, medians): {gains}.")
    lines.append(f"Goal in the report: {report['goal']}.")
    commits = sorted({str(r.get("commit")) for r in report["results"]})
    if len(commits) > 1 or commits == ["None"]:
        lines.append("These rows were not measured at one revision: " + "; ".join(
            f"{r['model']} {r['method']} {r.get('precision', 'fp32')} at "
            f"{r.get('commit') or 'a revision not recorded (measured before reports recorded their commit)'}"
            for r in report["results"]) + ".")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print docs/benchmarks.md's table from the committed report")
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--examples", type=int, default=None, help="records per run (default: per model)")
    parser.add_argument("--methods", default=None, help="e.g. lora,full (default: per model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both tools train at this precision (ftq: train.precision; LLaMA-Factory: bf16)")
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "train.json"))
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    lf_python = ensure_llamafactory()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    results = []
    models = ["tiny"] if args.quick else (args.models.split(",") if args.models else list(CONFIGS))
    for model_name in models:
        cfg = {**COMMON, **{k: v for k, v in CONFIGS[model_name].items() if k != "methods"}, "precision": args.precision}
        if args.examples:
            cfg["examples"] = args.examples
        source = str(tiny_source(work / "tiny-source")) if model_name == "tiny" else "embedded"
        base = materialize_base(source, work / f"{model_name}-base")
        data, data_name = alpaca_data(cfg["examples"])
        for method in (args.methods.split(",") if args.methods else CONFIGS[model_name]["methods"]):
            runs: dict[str, list[dict]] = {system: [] for system in SYSTEMS}
            for repeat in range(args.repeats):  # interleaved, so drift in machine load hits every system alike
                for system in SYSTEMS:
                    print(f"[{model_name} {method}] {system} repeat {repeat + 1}/{args.repeats}", file=sys.stderr,
                          flush=True)
                    runs[system].append(run_system(system, lf_python, base, data, method, cfg, work))
            equal = assert_equal_work(runs, f"{model_name} {method}")
            from ftq.provenance import record

            # each row its own commit: --models extends a report whose other rows may come from another revision
            row = {"model": model_name, "method": method, "precision": args.precision, "data": data_name,
                   "settings": cfg, "repeats": args.repeats,
                   "equal_work": equal, **summarize(runs), "commit": record(__file__)["commit"]}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "settings"}, indent=1), file=sys.stderr, flush=True)
    report = {
        "benchmark": "train_throughput",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads_per_run": COMMON["threads"],
                    "cpu_bf16_matrix_instructions": cpu_multiplies_bf16()},
        "versions": {"ftq": _version(sys.executable, "ftq"), "llamafactory": _version(lf_python, "llamafactory"),
                     "ftq_transformers": _version(sys.executable, "transformers"),
                     "llamafactory_transformers": _version(lf_python, "transformers")},
        "results": results,
        "goal": "ftq real tokens/s >= 1.5x the best LLaMA-Factory setting at a matching loss curve",
        "notes": [
            "Same token stream: every record carries SmolLM2's default system prompt explicitly; ftq renders it "
            "with the model's chat template, LLaMA-Factory with its smollm2 template; real-token counts are "
            f"asserted equal within {MAX_TOKEN_GAP:.1%} (equal_work).",
            "LLaMA-Factory runs its SFT defaults (padding to the longest in a random batch) and its packing "
            "(packing + neat_packing: block-diagonal attention, examples isolated as in ftq's packing); "
            "ftq runs its defaults (group_by_length) and packing.",
            "Each system runs `repeats` times, interleaved; speedups are the median of per-repeat ratios "
            "against the best LLaMA-Factory setting (the one with the higher median) in the same repeat.",
            "LLaMA-Factory's torchaudio import (audio inputs only) gets an empty placeholder: no torchaudio "
            "build loads beside torch 2.13.",
            "Both train one epoch over the same records; real tokens are non-padding tokens, divided by "
            "the Trainer's train_runtime.",
        ],
    }
    out = Path(args.out)
    # a partial run (--models) replaces its own rows and keeps the others
    if out.exists():
        previous = json.loads(out.read_text()).get("results", [])
        fresh = {row_key(r) for r in results}
        report["results"] = [r for r in previous if row_key(r) not in fresh and "equal_work" in r] + results
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(out, stamp(report, script=__file__))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def row_key(row: dict) -> tuple[str, str, str]:
    return row["model"], row["method"], row.get("precision", "fp32")  # rows from before --precision ran fp32


def _version(python, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version('{package}'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
