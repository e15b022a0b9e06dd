"""DPO throughput: ftq's preference stage against LLaMA-Factory's DPO on the same model, pairs and settings.

Both tools train DPO (sigmoid loss, beta 0.1) with a new LoRA adapter (rank 16, alpha 32, all linear
layers, no dropout) on SmolLM2-135M-Instruct as ftq's base stage makes it, the reference being the
policy with its adapter disabled (LLaMA-Factory's default for LoRA, ftq's `start_from: base`), for one
epoch over the same Alpaca pairs (the first `--pairs` of data/raw/ftq_default/preference.json, each with
SmolLM2's default system prompt given explicitly, so ftq's chat template and LLaMA-Factory's `smollm2`
template render the same text; real-token counts are asserted equal within 0.5 %), with the same
batch size, learning rate, schedule, seed, precision and thread count. LLaMA-Factory runs in its own
virtualenv (bench/.venv-llamafactory, made on first use as bench/train_throughput.py makes it); it is run
in float32 and in bf16 (its fastest here), ftq likewise, and each repeat pairs ftq with the
best LLaMA-Factory setting of that repeat. Real tokens are the non-padding tokens of both answers'
sequences (prompt + answer, each pair's two), over the Trainer's own train_runtime. `--repeats` (default
3), interleaved; medians, spreads and the median paired ratio go to reports/bench/preference_train.json.

    .venv/bin/python bench/preference_throughput.py            # ~15 min on 2 CPU cores
    .venv/bin/python bench/preference_throughput.py --table    # README's table, from the committed report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import (MAX_TOKEN_GAP, SYSTEM_PROMPT, _version, bench_env, ensure_llamafactory,  # noqa: E402
                              lf_config, materialize_base, sh, torchaudio_placeholder)

OUT = REPO / "reports" / "bench" / "preference_train.json"
COMMON = {"max_length": 512, "learning_rate": 5e-5, "lora_rank": 16, "lora_alpha": 32, "seed": 42, "threads": 1,
          "batch_size": 4, "beta": 0.1}
PRECISIONS = ("fp32", "bf16")


def pairs_file(limit: int, folder: Path) -> Path:
    source = REPO / "data" / "raw" / "ftq_default" / "preference.json"
    records = [{**r, "system": SYSTEM_PROMPT} for r in json.loads(source.read_text())[:limit]]
    path = folder / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def ftq_tokens(base: Path, data: Path, max_length: int) -> int:
    """Real tokens per epoch as ftq feeds DPO: each pair's prompt + chosen and prompt + rejected."""
    from transformers import AutoTokenizer

    from ftq.data.check import check_file
    from ftq.data.formats import FormatSpec
    from ftq.data.tokenize import tokenize_preference

    spec = FormatSpec.build("alpaca", COLUMNS, None, "", True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    total = 0
    for record in check_file(data, spec).conversations:
        t = tokenize_preference(tokenizer, record, max_length)
        total += 2 * len(t.prompt_ids) + len(t.answers["chosen"]) + len(t.answers["rejected"])
    return total


COLUMNS = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected", "system": "system"}


def run_ftq(base: Path, data: Path, cfg: dict, precision: str, work: Path) -> dict:
    project = work / f"ftq-{precision}"
    shutil.rmtree(project, ignore_errors=True)
    (project / "data" / "raw").mkdir(parents=True)
    shutil.copy(data, project / "data" / "raw" / "pairs.json")
    (project / "data" / "datasets.yaml").write_text(yaml.safe_dump(
        {"pairs": {"file": "raw/pairs.json", "format": "alpaca", "ranking": True, "columns": COLUMNS}}))
    (project / "models").mkdir()
    os.symlink(base, project / "models" / "base")
    params = {
        "train": {"method": "lora", "precision": precision, "lora": {"rank": cfg["lora_rank"], "alpha": cfg["lora_alpha"],
                                                                   "dropout": 0.0, "target_modules": "all-linear"}},
        "preference": {"objective": "dpo", "start_from": "base", "datasets": ["pairs"], "eval_datasets": ["pairs"],
                       "eval_examples": 4, "max_length": cfg["max_length"], "beta": cfg["beta"],
                       "learning_rate": cfg["learning_rate"], "lr_scheduler": "cosine", "warmup": 0, "epochs": 1,
                       "per_device_batch_size": cfg["batch_size"], "seed": cfg["seed"], "save_steps": 10_000},
        "tracking": {"experiment": "bench"},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    sh([sys.executable, "-m", "ftq", "preference"], cwd=project, env=bench_env(cfg["threads"]))
    report = json.loads((project / "reports" / "preference.json").read_text())
    losses = [float(line.split(",")[1]) for line in (project / "reports" / "preference_log.csv").read_text().splitlines()[1:]]
    return {"train_seconds": report["train_runtime_seconds"], "steps": report["steps"], "losses": losses,
            "precision": report["precision"], "peak_memory_bytes": report.get("peak_memory_bytes")}


def run_llamafactory(python: Path, base: Path, data: Path, cfg: dict, precision: str, work: Path) -> dict:
    folder = work / f"lf-{precision}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    shutil.copy(data, folder / "data" / "pairs.json")
    (folder / "data" / "dataset_info.json").write_text(json.dumps(
        {"pairs": {"file_name": "pairs.json", "ranking": True, "columns": COLUMNS}}))
    config = {**lf_config(base, folder, "pairs", {**cfg, "precision": precision}), "stage": "dpo",
              "finetuning_type": "lora", "pref_beta": cfg["beta"], "pref_loss": "sigmoid", "lora_rank": cfg["lora_rank"],
              "lora_alpha": cfg["lora_alpha"], "lora_dropout": 0.0, "lora_target": "all"}
    (folder / "train.yaml").write_text(yaml.safe_dump(config))
    env = bench_env(cfg["threads"])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(torchaudio_placeholder())
    sh([str(python), "-m", "llamafactory.cli", "train", str(folder / "train.yaml")], cwd=folder, env=env)
    state = json.loads((folder / "out" / "trainer_state.json").read_text())
    results = json.loads((folder / "out" / "train_results.json").read_text())
    return {"train_seconds": results["train_runtime"], "steps": state["global_step"],
            "losses": [e["loss"] for e in state["log_history"] if "loss" in e], "precision": precision,
            "real_tokens": lf_tokens(python, folder / "tokenized")}


def lf_tokens(python: Path, tokenized: Path) -> int:
    """Non-padding tokens of LLaMA-Factory's pairwise examples: chosen and rejected sequences (each
    holding the prompt), every example once (one epoch)."""
    code = ("import sys; from datasets import load_from_disk; d=load_from_disk(sys.argv[1]);"
            "d=d['train'] if hasattr(d,'keys') else d;"
            "print(sum(len(x) for x in d['chosen_input_ids']) + sum(len(x) for x in d['rejected_input_ids']))")
    return int(sh([str(python), "-c", code, str(tokenized)]).stdout.strip())


def summarize(runs: dict[str, list[dict]], tokens: dict[str, int]) -> dict:
    row = {}
    for system, repeats in runs.items():
        speeds = [tokens[system] / r["train_seconds"] for r in repeats]
        row[system] = {"real_tokens_per_second": round(statistics.median(speeds), 2),
                       "real_tokens_per_second_runs": [round(s, 2) for s in speeds],
                       "spread": round((max(speeds) - min(speeds)) / statistics.median(speeds), 3),
                       "train_seconds_median": round(statistics.median(r["train_seconds"] for r in repeats), 2),
                       "steps": repeats[0]["steps"], "real_tokens": tokens[system],
                       "first_loss": repeats[0]["losses"][0], "last_loss": repeats[0]["losses"][-1]}
    lf = [s for s in runs if s.startswith("llamafactory")]
    for system in [s for s in runs if s.startswith("ftq")]:
        ratios = []
        for i, mine in enumerate(runs[system]):
            best = max(lf, key=lambda s: tokens[s] / runs[s][i]["train_seconds"])
            ratios.append((tokens[system] / mine["train_seconds"]) / (tokens[best] / runs[best][i]["train_seconds"]))
        row[system]["speedup_vs_best_llamafactory"] = round(statistics.median(ratios), 3)
        row[system]["speedup_vs_best_llamafactory_runs"] = [round(x, 3) for x in ratios]
    return row


def table(report: dict) -> str:
    rows = report["systems"]
    lines = ["| system | precision | real tokens/s (median of {n}) | spread | steps | last loss | speed vs best LLaMA-Factory |".format(
        n=report["repeats"]), "|---|---|---|---|---|---|---|"]
    for system, r in rows.items():
        tool, precision = system.rsplit("_", 1)
        ratio = r.get("speedup_vs_best_llamafactory")
        lines.append(f"| {'ftq' if tool == 'ftq' else 'LLaMA-Factory ' + report['llamafactory_version']} | {precision} | "
                     f"{r['real_tokens_per_second']:.0f} | {r['spread']:.0%} | {r['steps']} | {r['last_loss']:.5f} | "
                     f"{f'{ratio:.2f}x (median paired)' if ratio else '–'} |")
    lines += ["", f"DPO, LoRA r=16 on SmolLM2-135M-Instruct, {report['pairs']} pairs, batch {report['settings']['batch_size']}, "
              f"{report['settings']['threads']} thread(s); {report['machine']}. Real tokens per epoch: "
              f"{', '.join(f'{k} {v:,}' for k, v in report['equal_work']['real_tokens'].items())} "
              f"(gap {report['equal_work']['gap']:.2%})."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    lf_python = ensure_llamafactory()
    work = Path(tempfile.mkdtemp(prefix="bench-preference-"))
    base = materialize_base("embedded", work / "base")
    data = pairs_file(args.pairs, work)
    cfg = dict(COMMON)
    systems = [f"{tool}_{p}" for p in PRECISIONS for tool in ("ftq", "llamafactory")]
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for repeat in range(args.repeats):
        for system in systems:
            tool, precision = system.rsplit("_", 1)
            result = (run_ftq(base, data, cfg, precision, work) if tool == "ftq"
                      else run_llamafactory(lf_python, base, data, cfg, precision, work))
            print(f"repeat {repeat + 1}: {system} {result['train_seconds']:.1f} s, {result['steps']} steps", file=sys.stderr)
            runs[system].append(result)
    ftq_count = ftq_tokens(base, data, cfg["max_length"])
    tokens = {s: ftq_count if s.startswith("ftq") else runs[s][0]["real_tokens"] for s in systems}
    gap = (max(tokens.values()) - min(tokens.values())) / max(tokens.values())
    if gap > MAX_TOKEN_GAP:
        raise AssertionError(f"real-token counts differ by {gap:.2%}: {tokens}")
    steps = {runs[s][0]["steps"] for s in systems}
    if len(steps) != 1:
        raise AssertionError(f"the systems ran different step counts: { {s: runs[s][0]['steps'] for s in systems} }")
    report = {"settings": cfg, "pairs": args.pairs, "repeats": args.repeats, "systems": summarize(runs, tokens),
              "equal_work": {"real_tokens": tokens, "gap": round(gap, 5), "steps": steps.pop()},
              "llamafactory_version": _version(lf_python, "llamafactory"),
              "ftq_trl": _version(Path(sys.executable), "trl"), "llamafactory_trl": _version(lf_python, "trl"),
              "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"}
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(OUT, stamp(report, script=__file__))
    shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
