"""Quantization benchmark: build time and peak memory per method, and perplexity on held-out plain
text for the merged model vs. each build (each scored by its own runtime), as a ratio to compare with
llama.cpp's published deltas.

    .venv/bin/python bench/quantize.py                       # the default GGUF builds
    .venv/bin/python bench/quantize.py --builds q8_0,q4_k_m,q4_0,awq_w4g64,gptq_w4g64

Needs models/merged and data/processed (run `ftq run merge` first). The held-out text is the answers of
../shared/data/sft/alpaca_en_demo.json (not in the default training set), cut into token windows; with
../shared absent it falls back to the project's held-out split. Every build and every perplexity run is
its own process, so peak memory (max RSS) belongs to that one job. Results are merged into
reports/bench/quantize.json by build name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_SFT = Path(os.environ.get("FTQ_SHARED_DATA", ROOT.parent / "shared" / "data")) / "sft" / "alpaca_en_demo.json"
OUT = ROOT / "reports" / "bench" / "quantize.json"
# llama.cpp's own table (tools/quantize/quantize.cpp in the vendored 0.3.36 sources): absolute wikitext-2
# perplexity increase over F16 for Llama-3-8B
LLAMA_CPP_PUBLISHED = {
    "q8_0": "+0.0026 ppl @ Llama-3-8B",
    "q4_k_m": "+0.1754 ppl @ Llama-3-8B",
    "q4_k_s": "+0.2689 ppl @ Llama-3-8B",
    "q4_0": "+0.4685 ppl @ Llama-3-8B",
    "q6_k": "+0.0217 ppl @ Llama-3-8B",
}


def heldout_windows(tokenizer_dir: Path, windows: int, width: int) -> tuple[str, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if SHARED_SFT.exists():
        records = json.loads(SHARED_SFT.read_text())
        text = "\n\n".join(r["output"] for r in records if r.get("output"))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        chunks = [ids[i : i + width] for i in range(0, len(ids) - width + 1, width)][:windows]
        return f"{SHARED_SFT.name} answers, {len(chunks)} windows of {width} tokens", chunks
    sys.path.insert(0, str(ROOT / "src"))
    from ftq.quantize.calibration import heldout

    seqs = heldout(ROOT, windows, width)
    return "project held-out split (../shared absent)", seqs.ids


def peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker_build(name: str, out: Path) -> dict:
    """In a child process: one build of models/merged with the options in params.yaml."""
    from ftq.params import load_params
    from ftq.quantize import backend
    from ftq.quantize.calibration import sample
    from ftq.stages.quantize import build_spec

    spec = build_spec(load_params(ROOT / "params.yaml"), name)
    method = backend(spec.method)
    calibration = None
    if method.NEEDS_CALIBRATION:
        cal = spec.calibration
        calibration = sample(ROOT, cal["split"], int(cal["samples"]), int(cal["max_length"]), cal["seed"])
    started = time.time()
    built = method.build(ROOT / "models" / "merged", out, spec.options, calibration)
    seconds = time.time() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"method": spec.method, "options": spec.options, "build_seconds": round(seconds, 2),
            "peak_memory_bytes": max(peak_rss(), children), "size_bytes": size,
            "artifact": str(out / built.get("artifact", "")),
            "calibration": None if calibration is None else calibration.describe()}


def worker_perplexity(path: Path, windows_file: Path) -> dict:
    import math

    from ftq.runtimes import open_model

    windows = json.loads(windows_file.read_text())
    started = time.time()
    runtime = open_model(path)
    total, count = 0.0, 0
    for ids in windows:
        nll, n = runtime.sequence_nll(ids)
        total += nll
        count += n
    runtime.close()
    return {"perplexity": round(math.exp(total / count), 4), "tokens": count, "runtime": runtime.kind,
            "seconds": round(time.time() - started, 2), "peak_memory_bytes": peak_rss()}


def child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builds", default="q8_0,q4_k_m,q4_0", help="names in params.yaml quantize.builds")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--worker-build", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-perplexity", nargs=2, metavar=("PATH", "WINDOWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_build:
        print(json.dumps(worker_build(args.worker_build[0], Path(args.worker_build[1]))))
        return
    if args.worker_perplexity:
        print(json.dumps(worker_perplexity(Path(args.worker_perplexity[0]), Path(args.worker_perplexity[1]))))
        return

    merged = ROOT / "models" / "merged"
    if not (merged / "config.json").exists():
        sys.exit(f"{merged}: no merged model; run `ftq run merge` first")
    text, windows = heldout_windows(merged, args.windows, args.width)
    report = json.loads(OUT.read_text()) if OUT.exists() else {}

    def save(rows: dict, reference: dict) -> None:
        report.update({
            "model": json.loads((merged / "ftq_merge.json").read_text())["lineage"]["base_source"],
            "merged_size_bytes": sum(p.stat().st_size for p in merged.rglob("*") if p.is_file()),
            "heldout": text,
            "merged_perplexity": reference["perplexity"],
            "merged_runtime": reference["runtime"],
            "tokens_scored": reference["tokens"],
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "builds": rows,
        })
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="ftq-bench-quantize-") as scratch:
        windows_file = Path(scratch) / "windows.json"
        windows_file.write_text(json.dumps(windows))
        reference = child("--worker-perplexity", str(merged), str(windows_file))
        print(f"merged: perplexity {reference['perplexity']} over {reference['tokens']} tokens", flush=True)
        rows = report.get("builds", {})
        for name in args.builds.split(","):
            out = Path(scratch) / name
            out.mkdir()
            built = child("--worker-build", name, str(out))
            scored = child("--worker-perplexity", built["artifact"], str(windows_file))
            ratio = scored["perplexity"] / reference["perplexity"]
            rows[name] = {**{k: v for k, v in built.items() if k != "artifact"},
                          "perplexity": scored["perplexity"], "perplexity_ratio": round(ratio, 4),
                          "perplexity_delta": round(scored["perplexity"] - reference["perplexity"], 4),
                          "runtime": scored["runtime"], "score_seconds": scored["seconds"],
                          "load_and_score_peak_memory_bytes": scored["peak_memory_bytes"],
                          "compression_ratio": round(sum(p.stat().st_size for p in merged.rglob("*") if p.is_file())
                                                     / built["size_bytes"], 3),
                          "llama_cpp_published": LLAMA_CPP_PUBLISHED.get(built["options"].get("type", ""))}
            print(f"{name}: {built['build_seconds']} s, peak {built['peak_memory_bytes'] / 2**20:.0f} MiB, "
                  f"{built['size_bytes'] / 2**20:.1f} MiB, perplexity {scored['perplexity']} ({ratio:.4f}x)", flush=True)
            shutil_rmtree(out)
            save(rows, reference)
    print(f"wrote {OUT}")


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
