"""llama.cpp's CPU build on this machine: prompt processing and decode speed of the ways to make ggml's AMX
kernels safe, with llama.cpp's own `llama-bench` (same GGUF files, threads, prompt and answer lengths,
one machine, one run; 5 repeats each, median and spread), and the fidelity of the AMX kernels against
the AVX-512 ones with llama.cpp's own `llama-perplexity --kl-divergence`.

    .venv/bin/python bench/llama_cpu_build.py --no-amx-build DIR [--unpatched-build DIR]

Variants (each a folder holding llama-bench and llama-perplexity):
- patched: the installed build (.venv/share/ftq/llama.cpp/bin), AMX kernels with the upstream fix
  (src/ftq/llama_build/patches), extra buffer types on: what `make install` builds, and what ftq runs;
- patched, --no-repack: the same binary with llama.cpp's extra buffer types switched off at run time
  (`--no-repack` / `use_extra_bufts=False`, the run-time workaround);
- no AMX: the same sources built with `make install FTQ_LLAMA_AMX=0` (-mno-amx-*), extra buffer types on;
- unpatched (optional): the AMX build without the patch, recorded as it ends (a crash on an AMX host).

The files: the embedded SmolLM2-135M Q4_1 GGUF and, requantized from it with llama-quantize
(--allow-requantize: speed is what is measured, not quality), Q8_0, Q4_K_M and Q4_0, the types ftq
builds. Writes reports/bench/llama_cpu_build.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "llama_cpu_build.json"
INSTALLED = Path(sys.prefix) / "share" / "ftq" / "llama.cpp" / "bin"
TYPES = ["Q8_0", "Q4_K_M", "Q4_0"]
PROMPT, ANSWER, REPEATS = 512, 64, 5
SHARED_SFT = ROOT.parent / "shared" / "data" / "sft" / "alpaca_en_demo.json"


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
    model = next(line for line in info.splitlines() if line.startswith("model name")).split(":", 1)[1].strip()
    return {"model": model, "amx": sorted(f for f in flags if f.startswith("amx")),
            "avx512": sorted(f for f in flags if f.startswith("avx512"))}


def models(folder: Path) -> list[Path]:
    from ftq.stages.base import embedded_gguf

    embedded = embedded_gguf()
    files = [embedded]
    for kind in TYPES:
        target = folder / f"SmolLM2-135M-Instruct.{kind}.gguf"
        subprocess.run([str(INSTALLED / "llama-quantize"), "--allow-requantize", str(embedded), str(target), kind, "2"],
                       check=True, capture_output=True)
        files.append(target)
    return files


def llama_bench(binary: Path, files: list[Path], threads: int, repack: bool) -> dict:
    command = [str(binary / "llama-bench"), *sum((["-m", str(f)] for f in files), []), "-t", str(threads),
               "-p", str(PROMPT), "-n", str(ANSWER), "-r", str(REPEATS), "--repack", "1" if repack else "0", "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        from ftq.processes import describe_exit

        return {"command": " ".join(command[:1]) + " ...", "ended": describe_exit(result.returncode), "rows": []}
    rows = []
    for row in json.loads(result.stdout):
        samples = row["samples_ts"]
        rows.append({"file": Path(row["model_filename"]).name, "type": row["model_type"],
                     "test": f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}",
                     "threads": row["n_threads"], "repack": row["repack"], "n_prompt": row["n_prompt"],
                     "n_gen": row["n_gen"], "tok_s_median": round(statistics.median(samples), 1),
                     "tok_s_min": round(min(samples), 1), "tok_s_max": round(max(samples), 1),
                     "repeats": len(samples), "cpu_info": row.get("cpu_info")})
    return {"ended": "ok", "rows": rows}


def fidelity(amx: Path, no_amx: Path, files: list[Path], work: Path, threads: int) -> list[dict]:
    """KL divergence of the AMX kernels' next-token distributions against the AVX-512 kernels' on the same
    GGUF and text (llama-perplexity), and of both against an F32 copy of the same Q8_0 weights."""
    if not SHARED_SFT.exists():
        return []
    records = json.loads(SHARED_SFT.read_text())
    text = work / "text.txt"
    text.write_text("\n\n".join(r["instruction"] + "\n" + r["output"] for r in records))
    args = ["-f", str(text), "-c", "512", "--chunks", "20", "-t", str(threads)]

    def kld(base_binary: Path, base_file: Path, binary: Path, file: Path) -> dict:
        logits = work / f"{base_binary.parent.name}-{base_file.stem}.kld"
        if not logits.exists():
            subprocess.run([str(base_binary / "llama-perplexity"), "-m", str(base_file), *args,
                            "--kl-divergence-base", str(logits)], check=True, capture_output=True)
        out = subprocess.run([str(binary / "llama-perplexity"), "-m", str(file), *args, "--kl-divergence-base",
                              str(logits), "--kl-divergence"], check=True, capture_output=True, text=True)
        return parse_kld(out.stdout + out.stderr)

    q8 = next(f for f in files if "Q8_0" in f.name)
    as_f32 = work / "Q8_0-as-F32.gguf"
    subprocess.run([str(INSTALLED / "llama-quantize"), "--allow-requantize", str(q8), str(as_f32), "F32", "2"],
                   check=True, capture_output=True)
    rows = []
    for file in (files[0], q8):
        rows.append({"compared": "AMX kernels vs AVX-512 kernels", "file": file.name, **kld(no_amx, file, amx, file)})
    for name, binary in (("AVX-512 kernels", no_amx), ("AMX kernels", amx)):
        rows.append({"compared": f"{name} vs F32 of the same Q8_0 weights", "file": q8.name, **kld(no_amx, as_f32, binary, q8)})
    return rows


def parse_kld(log: str) -> dict:
    def value(label: str) -> float:
        line = next(line for line in log.splitlines() if line.strip().startswith(label))
        return float(line.split(":", 1)[1].split()[0])

    return {"kld_mean": value("Mean    KLD"), "kld_p99": value("99.0%   KLD"), "same_top1_pct": value("Same top p")}


def table(report: dict) -> str:
    """README's table (README.md holds it between generated-by markers; tests/test_readme.py compares)."""
    variants = report["variants"]
    lines = ["| file | test | " + " | ".join(f"{name} tok/s" for name in variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for row in variants["patched"]["rows"]:
        cells = []
        for variant in variants.values():
            match = next((r for r in variant["rows"] if (r["file"], r["test"]) == (row["file"], row["test"])), None)
            cells.append(f"{match['tok_s_median']:.1f} ({match['tok_s_min']:.0f}-{match['tok_s_max']:.0f})" if match
                         else variant["ended"].split(" (")[0])
        lines.append(f"| {row['type']} | {row['test']} | " + " | ".join(cells) + " |")
    kld = [f"| {r['compared']} | {r['file'].split('.', 1)[1].removesuffix('.gguf')} | {r['kld_mean']:.6f} | "
           f"{r['kld_p99']:.6f} | {r['same_top1_pct']:.2f} % |" for r in report["kld"]]
    if kld:
        lines += ["", "| next-token distributions | file | KLD mean | KLD p99 | same top-1 |", "|---|---|---|---|---|", *kld]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print README's table from the committed report")
    parser.add_argument("--no-amx-build", type=Path, help="bin folder of a FTQ_LLAMA_AMX=0 build")
    parser.add_argument("--unpatched-build", type=Path, help="bin folder of an AMX build without the patch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    if not args.no_amx_build:
        parser.error("--no-amx-build is needed to measure")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        files = models(work)
        variants = {
            "patched": llama_bench(INSTALLED, files, args.threads, repack=True),
            "patched, --no-repack": llama_bench(INSTALLED, files, args.threads, repack=False),
            "no AMX": llama_bench(args.no_amx_build, files, args.threads, repack=True),
        }
        if args.unpatched_build:
            variants["unpatched"] = llama_bench(args.unpatched_build, files, args.threads, repack=True)
        kld_rows = fidelity(INSTALLED, args.no_amx_build, files, work, args.threads)
    measured = [v for v in variants.values() if v["rows"]]
    keys = [sorted((r["file"], r["test"], r["threads"], r["n_prompt"], r["n_gen"], r["repeats"]) for r in v["rows"])
            for v in measured]
    assert all(k == keys[0] for k in keys), "the variants did not do the same work"
    speedup = {}
    for row in variants["patched"]["rows"]:
        for other in ("patched, --no-repack", "no AMX"):
            match = next(r for r in variants[other]["rows"] if (r["file"], r["test"]) == (row["file"], row["test"]))
            speedup.setdefault(f"patched / {other}", {})[f"{row['type']} {row['test']}"] = round(
                row["tok_s_median"] / match["tok_s_median"], 2)
    report = {"machine": {"cpu": cpu(), "cores": len(__import__("os").sched_getaffinity(0)),
                          "python": platform.python_version()},
              "settings": {"threads": args.threads, "prompt_tokens": PROMPT, "answer_tokens": ANSWER,
                           "repeats": REPEATS, "tool": "llama-bench (llama.cpp 0.3.36's vendored sources)"},
              "variants": variants, "speedup_of_medians": speedup, "kld": kld_rows}
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(OUT, stamp(report, script=__file__))
    for name, ratios in speedup.items():
        print(name, ratios)
    for row in kld_rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
