"""Quantization benchmark: build time and peak memory per method, and perplexity on held-out plain
text for the merged model vs. each build (each scored by its own runtime), as a ratio to compare with
llama.cpp's published deltas.

    .venv/bin/python bench/quantize.py                       # the default GGUF builds
    .venv/bin/python bench/quantize.py --builds q8_0,q4_k_m,q4_0,awq_w4g64,gptq_w4g64
    .venv/bin/python bench/quantize.py --ladder              # every GGUF type, with and without the imatrix
    .venv/bin/python bench/quantize.py --table               # README's ladder table, from the committed report

--ladder measures the importance matrix's effect (needs models/merged, models/reference and models/imatrix:
`ftq run imatrix reference`): each type of LADDER is quantized from one f16 GGUF of merged, with and
without stage imatrix's matrix (types of 4 bits or fewer; iq2_xs only with it, as llama-quantize demands),
and measured twice: by ftq's screen (KL divergence and top-1 agreement against merged's reference on the
held-out task answers, ftq.quantize.distance) and by llama.cpp's own `llama-perplexity --kl-divergence`
against the f16 GGUF over general text (the held-out windows below). Sizes, KLDs and times go to
reports/bench/quantize.json under "ladder".

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


LADDER = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m", "iq3_xxs", "q2_k", "iq2_xs"]
KLD_CONTEXT, KLD_CHUNKS = 256, 24  # llama-perplexity --kl-divergence: 24 chunks of 256 tokens (the second halves scored)


def llama_kld(base_logits: Path, model: Path, text: Path) -> dict:
    """llama.cpp's own KL divergence of `model` against the f16 logits saved in `base_logits`."""
    import re

    from ftq.quantize.gguf import tool

    done = subprocess.run([str(tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(KLD_CONTEXT),
                           "--chunks", str(KLD_CHUNKS), "--kl-divergence-base", str(base_logits), "--kl-divergence",
                           "-t", str(os.cpu_count())], capture_output=True, text=True)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"llama-perplexity --kl-divergence failed ({done.returncode}):\n{out[-2000:]}")

    def number(label: str) -> float:
        return float(re.search(rf"{re.escape(label)}\s*:?\s*(-?[\d.]+)", out).group(1))

    return {"kld_mean": number("Mean    KLD:"), "kld_p99": number("99.0%   KLD:"), "kld_median": number("Median  KLD:"),
            "same_top_p": number("Same top p:") / 100, "ppl_ratio": number("Mean PPL(Q)/PPL(base)")}


def ladder(types: list[str], text_windows: list[list[int]], described: str) -> dict:
    """Every type with and without the importance matrix: size, ftq's KLD and llama.cpp's KLD, times."""
    from transformers import AutoTokenizer

    from ftq.quantize import distance, gguf
    from ftq.runtimes import open_model

    merged, matrix = ROOT / "models" / "merged", ROOT / "models" / "imatrix" / "imatrix.gguf"
    if not matrix.exists() or not (ROOT / "models" / "reference").exists():
        sys.exit("models/imatrix and models/reference are needed: `ftq run imatrix reference` first")
    reference = distance.load(ROOT / "models" / "reference")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ftq-bench-ladder-") as scratch:
        scratch = Path(scratch)
        f16 = scratch / "model-f16.gguf"
        gguf.convert(merged, f16, "f16")
        text = scratch / "text.txt"
        text.write_text("".join(tokenizer.decode(w) for w in text_windows))
        base_logits = scratch / "f16.kld"
        subprocess.run([str(gguf.tool("llama-perplexity")), "-m", str(f16), "-f", str(text), "-c", str(KLD_CONTEXT),
                        "--chunks", str(KLD_CHUNKS), "--kl-divergence-base", str(base_logits),
                        "-t", str(os.cpu_count())], check=True, capture_output=True)
        for file_type in types:
            for with_matrix in (False, True):
                opts = gguf.validate({"type": file_type, "imatrix": with_matrix}, file_type) \
                    if (with_matrix or file_type not in gguf.NEEDS_IMATRIX) else None
                if opts is None or (with_matrix and (gguf.nominal_bits(file_type) or 9) > gguf.IMATRIX_AUTO_BITS):
                    continue
                name = file_type + ("+imatrix" if with_matrix else "")
                out = scratch / f"{name}.gguf"
                started = time.time()
                gguf.quantize(f16, out, opts, os.cpu_count() or 1, matrix if with_matrix else None)
                seconds = time.time() - started
                runtime = open_model(out, n_ctx=2048)
                ours = distance.divergence(runtime, reference)
                runtime.close()
                theirs = llama_kld(base_logits, out, text)
                rows[name] = {"type": file_type, "imatrix": with_matrix, "size_bytes": out.stat().st_size,
                              "quantize_seconds": round(seconds, 2),
                              "ftq": {k: round(ours[k], 6) for k in ("kld_mean", "kld_p99", "top1_agreement")},
                              "llama_perplexity": theirs}
                print(f"{name}: {out.stat().st_size / 1e6:.1f} MB, ftq KLD {ours['kld_mean']:.4f} (top-1 "
                      f"{ours['top1_agreement']:.3f}), llama.cpp KLD {theirs['kld_mean']:.4f} (same top "
                      f"{theirs['same_top_p']:.3f}), {seconds:.1f} s", flush=True)
                out.unlink()
    effect = {}
    for name, row in rows.items():
        plain = rows.get(row["type"]) if row["imatrix"] else None
        if plain:
            effect[row["type"]] = {
                # the same tensor types: only llama.cpp's imatrix metadata keys add bytes
                "size_difference_bytes": row["size_bytes"] - plain["size_bytes"],
                "ftq_kld_change": round(row["ftq"]["kld_mean"] / plain["ftq"]["kld_mean"] - 1, 4),
                "llama_kld_change": round(row["llama_perplexity"]["kld_mean"] / plain["llama_perplexity"]["kld_mean"] - 1, 4)}
    info = json.loads((ROOT / "models" / "imatrix" / "imatrix.json").read_text())
    return {"builds": rows, "imatrix_effect": effect, "text": described,
            "imatrix": {k: info[k] for k in ("settings", "tokens", "chunks", "seconds", "sha256")},
            "reference": {"positions": reference.positions, "what": "merged's held-out task answers (models/reference)"},
            "llama_cpp_published": "Llama-3-8B vs F16, KLD: Q4_K_M 0.0313 -> 0.0282 with an importance matrix (-10 %), "
                                   "Q3_K_M -17 %, Q2_K -25 % (llama.cpp's scoreboard)",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


def table(report: dict) -> str:
    lad = report["ladder"]
    lines = ["| build | size MB | ftq KLD mean (task answers) | top-1 | llama.cpp KLD mean (general text) | same top token | "
             "quantize s |", "|---|---|---|---|---|---|---|"]
    for name, row in sorted(lad["builds"].items(), key=lambda kv: (-kv[1]["size_bytes"], kv[0])):
        ours, theirs = row["ftq"], row["llama_perplexity"]
        lines.append(f"| {name} | {row['size_bytes'] / 1e6:.1f} | {ours['kld_mean']:.4f} | {ours['top1_agreement']:.3f} | "
                     f"{theirs['kld_mean']:.4f} | {theirs['same_top_p']:.3f} | {row['quantize_seconds']:.1f} |")
    lines += ["", "| type | size difference (bytes) | KLD change with the importance matrix: ftq | llama.cpp |",
              "|---|---|---|---|"]
    for file_type, e in lad["imatrix_effect"].items():
        lines.append(f"| {file_type} | {e['size_difference_bytes']:+,} | {e['ftq_kld_change']:+.1%} | "
                     f"{e['llama_kld_change']:+.1%} |")
    m = lad["imatrix"]
    lines += ["", f"Importance matrix: {m['chunks']} chunks, {m['tokens']:,} tokens of the fine-tune's training data, "
                  f"{m['seconds']:.0f} s. ftq's KLD: {lad['reference']['positions']} answer positions of held-out task "
                  f"examples; llama.cpp's: {lad['text']}, the first {KLD_CHUNKS} chunks of {KLD_CONTEXT} tokens (second halves "
                  f"scored). Published: {lad['llama_cpp_published']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builds", default="q8_0,q4_k_m,q4_0", help="names in params.yaml quantize.builds")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--ladder", action="store_true", help="the GGUF ladder with and without the importance matrix")
    parser.add_argument("--types", default=",".join(LADDER), help="--ladder's GGUF types")
    parser.add_argument("--table", action="store_true", help="print README's ladder table from the committed report")
    parser.add_argument("--worker-build", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-perplexity", nargs=2, metavar=("PATH", "WINDOWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_build:
        print(json.dumps(worker_build(args.worker_build[0], Path(args.worker_build[1]))))
        return
    if args.worker_perplexity:
        print(json.dumps(worker_perplexity(Path(args.worker_perplexity[0]), Path(args.worker_perplexity[1]))))
        return

    if args.table:
        print(table(json.loads(OUT.read_text())))
        return
    merged = ROOT / "models" / "merged"
    if not (merged / "config.json").exists():
        sys.exit(f"{merged}: no merged model; run `ftq run merge` first")
    text, windows = heldout_windows(merged, args.windows, args.width)
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    report = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.ladder:
        sys.path.insert(0, str(ROOT / "src"))
        report["ladder"] = ladder(args.types.split(","), windows, text)
        atomic_write_json(OUT, stamp(report, script=__file__))
        print(table(report))
        return

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
        atomic_write_json(OUT, stamp(report, script=__file__))

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
