"""HellaSwag for the base model, cross-checked: ftq's two runtimes against llama.cpp's own implementation
and the figure the model's publisher gives.

    .venv/bin/python bench/benchmarks.py [--items 2000] [--seed 0] [--threads 2]
    .venv/bin/python bench/benchmarks.py --table      # README's table, from the committed report
    .venv/bin/python bench/benchmarks.py --precision  # only the float32-vs-bfloat16 section, into the report

On one seeded sample of the official validation set (../shared/data/hellaswag/hellaswag_val_full.txt,
the same items for every implementation), zero-shot:
- ftq, transformers: lm-eval's own `hellaswag` task through lm-eval's `hf` model on models/base (the
  embedded SmolLM2-135M-Instruct, dequantized to float32 by the base stage);
- ftq, llama.cpp: the same task through ftq's in-process llama.cpp model (ftq.evaluation.llamacpp_lm) on
  an F16 GGUF of the same weights;
- llama.cpp: `llama-perplexity --hellaswag` (built from the vendored sources by make install) on that
  same GGUF file, over a file holding exactly the sampled items;
- the SmolLM2-135M-Instruct model card's HellaSwag (lighteval, zero-shot, published; not measured here).
A `precision` section scores models/base through transformers in float32 and in bfloat16 (what
`evaluate.lm_eval.dtype: auto` picks on a CPU or GPU that multiplies bf16 natively) on the same items, item by item.

Scoring rules differ, so agreement is checked item by item under each rule: lm-eval's acc_norm picks
the ending with the highest log-likelihood per byte; llama.cpp picks the highest mean log-probability
per token (after the tokens the four endings share). ftq's per-ending log-likelihoods are scored under
llama.cpp's rule too, which must then agree with llama.cpp's own answers item by item; llama.cpp prints
only a running accuracy, and the order it takes items in is reproduced by bench/llama_hellaswag_order.cpp
(its std::mt19937(1) draw, compiled by the same compiler). Writes reports/bench/benchmarks.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OUT = ROOT / "reports" / "bench" / "benchmarks.json"
HELLASWAG = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val_full.txt"
LLAMA_BIN = Path(sys.prefix) / "share" / "ftq" / "llama.cpp" / "bin"
ORDER_SOURCE = Path(__file__).resolve().parent / "llama_hellaswag_order.cpp"
# https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, "Instruction model" table (lighteval, zero-shot)
MODEL_CARD = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "hellaswag": 40.9, "harness": "lighteval, zero-shot",
              "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_folder(work: Path) -> Path:
    """models/base when the pipeline has made it, else the same conversion of the embedded GGUF."""
    if (ROOT / "models" / "base" / "config.json").exists():
        return ROOT / "models" / "base"
    from ftq.stages import base

    source = base.resolve_source("embedded", ROOT)
    model, tokenizer = base.load_source(source, "auto")
    base.fix_special_tokens(model, tokenizer)
    base.strip_quantization(model)
    folder = work / "base"
    base.save_model(model, tokenizer, folder)
    return folder


def f16_gguf(folder: Path, work: Path) -> Path:
    from ftq.quantize import gguf

    gguf.build(folder, work / "f16", gguf.validate({"type": "f16"}, "bench"))
    return work / "f16" / "model.gguf"


def ftq_scores(runtime, name: str, items: int, seed: int, out: Path) -> tuple[list[dict], float]:
    """lm-eval's hellaswag over the sample, through the runtime: every scored item's row, and seconds."""
    from ftq.evaluation import harness, local_data

    cfg = harness.settings({"tasks": [], "batch_size": 8, "local_data": {"hellaswag": {
        "path": str(HELLASWAG), "format": local_data.HELLASWAG_LAYOUT, "sample": items, "seed": seed}}}, "bench")
    task = local_data.LocalTask.from_settings("hellaswag", cfg["local_data"]["hellaswag"], ROOT)
    planned = harness.plan(cfg, ROOT, "bench", {"hellaswag": local_data.manifest_entry(task)})
    started = time.perf_counter()
    harness.run(runtime, name, planned, out)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / f"{name}.samples.jsonl").read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"]), seconds


def token_counts(lm, rows: list[dict]) -> dict[int, list[int]]:
    """Each item's endings' token counts as lm-eval splits context and continuation (llama.cpp's rule
    divides by tokens)."""
    return {r["doc_id"]: [len(lm._encode_pair(r["doc"]["query"], " " + c)[1]) for c in r["doc"]["choices"]]
            for r in rows}


def per_token_pick(row: dict, counts: list[int]) -> int:
    """llama.cpp's rule on ftq's log-likelihoods: the ending with the highest mean log-prob per token."""
    logprobs = [float(resp[0][0] if isinstance(resp[0], list) else resp[0]) for resp in row["response"]]
    return max(range(len(logprobs)), key=lambda i: logprobs[i] / counts[i])


def llama_cpp_scores(gguf: Path, indices: list[int], items: list[dict], threads: int, work: Path) -> tuple[dict, float]:
    """llama-perplexity --hellaswag over a file of exactly the sampled items: {item index: correct}."""
    subset = work / "hellaswag_sample.txt"
    subset.write_text("".join(f"{items[i]['activity_label']}: {items[i]['ctx']}\n{items[i]['label']}\n"
                              + "".join(e + "\n" for e in items[i]["endings"]) for i in indices))
    order_bin = work / "order"
    subprocess.run(["g++", "-O2", "-o", str(order_bin), str(ORDER_SOURCE)], check=True)
    order = [int(line) for line in subprocess.run([str(order_bin), str(len(indices)), str(len(indices))], check=True,
                                                  capture_output=True, text=True).stdout.split()]
    started = time.perf_counter()
    done = subprocess.run([str(LLAMA_BIN / "llama-perplexity"), "-m", str(gguf), "-f", str(subset), "--hellaswag",
                           "--hellaswag-tasks", str(len(indices)), "-t", str(threads), "-c", "2048", "-b", "2048"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({done.returncode}):\n{done.stderr[-2000:]}")
    running = [(int(m.group(1)), float(m.group(2))) for m in
               re.finditer(r"^(\d+)\t([\d.]+)%\t\[", done.stdout + done.stderr, re.MULTILINE)]
    if len(running) != len(indices):
        raise RuntimeError(f"llama-perplexity printed {len(running)} of {len(indices)} tasks")
    correct, previous = {}, 0
    for (step, percent), position in zip(running, order):
        total = round(percent * step / 100)
        correct[indices[position]] = total - previous
        previous = total
    return correct, seconds


GUARD_ITEMS = 300  # evaluate's default HellaSwag sample
# realistic bad builds: q4_0 with its output matrix in Q4_0 too (the build the demo's quantize check rejects
# on the task), and q2_k (llama.cpp's smallest k-quant; on SmolLM2's 576-wide rows only down_proj takes Q2_K
# and the rest falls back to a 4-bit type)
BAD_BUILDS = [{"type": "q4_0", "output_type": "q4_0"}, {"type": "q2_k"}]


def guard_checks(base: Path, reference: Path, work: Path, seed: int, threads: int) -> list[dict]:
    """promote's general-ability guard, at its default tolerance, on each realistic bad build against the
    F16 GGUF (the reference here, as merged is in the pipeline), all on evaluate's default sample (the
    same items): the verdict each build would get."""
    from ftq import schema
    from ftq.quantize import gguf
    from ftq.runtimes import open_model
    from ftq.promotion.policy import Candidate, general_guard

    def scored(name: str, path: Path) -> list[dict]:
        runtime = open_model(path, threads=threads, n_ctx=2048)
        rows, _ = ftq_scores(runtime, name, GUARD_ITEMS, seed, work)
        runtime.close()
        return rows

    policy = schema.defaults("promote")["policy"]
    reference_rows = scored("reference", reference)
    verdicts = []
    for build in BAD_BUILDS:
        folder = work / f"bad_{build['type']}"
        gguf.build(base, folder, gguf.validate(dict(build), "bench"))
        label = build["type"] + (f" (output {build['output_type'].upper()})" if "output_type" in build else "")
        verdict = general_guard(Candidate(label, benchmark_rows=scored(folder.name, folder / "model.gguf")),
                                Candidate("reference", metrics={}, benchmark_rows=reference_rows),
                                policy["general_guard"], float(policy["confidence"]))
        verdicts.append({"build": build, "label": label, "size_bytes": (folder / "model.gguf").stat().st_size,
                         "reference": "F16 GGUF of models/base", **verdict})
    return verdicts


def measure(items: int, seed: int, threads: int) -> dict:
    from ftq.evaluation import local_data
    from ftq.evaluation.llamacpp_lm import LlamaCppLM
    from ftq.runtimes import open_model

    all_items = local_data.read_hellaswag_layout(HELLASWAG)
    indices = local_data.sample_indices(len(all_items), items, seed)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        base = base_folder(work)
        gguf = f16_gguf(base, work)
        runtime = open_model(base, threads=threads, dtype="float32")
        hf_rows, hf_seconds = ftq_scores(runtime, "transformers", items, seed, work)
        runtime.close()
        runtime = open_model(gguf, threads=threads, n_ctx=2048)
        gguf_rows, gguf_seconds = ftq_scores(runtime, "llama.cpp", items, seed, work)
        counts = token_counts(LlamaCppLM(runtime, 2048, 8), gguf_rows)
        runtime.close()
        llama, llama_seconds = llama_cpp_scores(gguf, indices, all_items, threads, work)
        guards = guard_checks(base, gguf, work, seed, threads)
    assert [r["doc_id"] for r in hf_rows] == [r["doc_id"] for r in gguf_rows] == indices == sorted(llama)
    gold = {i: int(all_items[i]["label"]) for i in indices}
    per_token = {r["doc_id"]: float(per_token_pick(r, counts[r["doc_id"]]) == gold[r["doc_id"]]) for r in gguf_rows}

    def mean(values) -> float:
        values = list(values)
        return round(100 * sum(values) / len(values), 2)

    def agreement(a: dict, b: dict) -> dict:
        same = sum(a[i] == b[i] for i in indices)
        return {"same_items": same, "different_items": len(indices) - same, "points": round(mean(a.values()) - mean(b.values()), 2)}

    hf = {r["doc_id"]: r for r in hf_rows}
    gg = {r["doc_id"]: r for r in gguf_rows}
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads},
        "data": {"file": str(HELLASWAG.relative_to(ROOT.parent)), "items_in_file": len(all_items), "sampled": len(indices),
                 "seed": seed, "sha256": local_data.file_sha256(HELLASWAG)},
        "rows": [
            {"implementation": "ftq, transformers (lm-eval hf)", "model": "models/base (float32)",
             "acc": mean(r["acc"] for r in hf_rows), "acc_norm": mean(r["acc_norm"] for r in hf_rows),
             "seconds": round(hf_seconds, 1), "seconds_per_item": round(hf_seconds / len(indices), 4)},
            {"implementation": "ftq, llama.cpp (in process)", "model": "F16 GGUF of models/base",
             "acc": mean(r["acc"] for r in gguf_rows), "acc_norm": mean(r["acc_norm"] for r in gguf_rows),
             "acc_per_token": mean(per_token.values()),
             "seconds": round(gguf_seconds, 1), "seconds_per_item": round(gguf_seconds / len(indices), 4)},
            {"implementation": "llama.cpp llama-perplexity --hellaswag", "model": "the same F16 GGUF",
             "acc_per_token": mean(llama.values()),
             "seconds": round(llama_seconds, 1), "seconds_per_item": round(llama_seconds / len(indices), 4)},
        ],
        "model_card": MODEL_CARD,
        "guards": guards,
        "agreement": {
            # the same rule, two runtimes of the same weights (float32 vs F16)
            "transformers vs llama.cpp runtime, acc_norm": agreement({i: hf[i]["acc_norm"] for i in indices},
                                                                     {i: gg[i]["acc_norm"] for i in indices}),
            # the same rule (mean log-prob per token), the same file: ftq's log-likelihoods vs llama.cpp's own
            "ftq llama.cpp per-token vs llama-perplexity": agreement(per_token, llama),
            # what the two published rules give on the same items
            "ftq acc_norm (per byte) vs llama-perplexity (per token)": agreement(
                {i: gg[i]["acc_norm"] for i in indices}, llama),
        },
    }


def precision(items: int, seed: int, threads: int) -> dict:
    """models/base in float32 and in bfloat16 through the transformers runtime, on the same items: each
    score and time, and how many items' answers the dtype changes (acc and acc_norm)."""
    import torch

    from ftq.hf import cpu_multiplies_bf16
    from ftq.runtimes import open_model

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        base = base_folder(work)
        scored = {}
        for dtype in ("float32", "bfloat16"):
            runtime = open_model(base, threads=threads, dtype=dtype)
            assert runtime.model.dtype == getattr(torch, dtype)
            scored[dtype] = ftq_scores(runtime, dtype, items, seed, work)
            runtime.close()
    (fp32, fp32_seconds), (bf16, bf16_seconds) = scored["float32"], scored["bfloat16"]
    assert [r["doc_id"] for r in fp32] == [r["doc_id"] for r in bf16]

    def mean(rows, metric) -> float:
        return round(100 * sum(r[metric] for r in rows) / len(rows), 2)

    return {
        "items": len(fp32), "seed": seed, "threads": threads, "cpu_multiplies_bf16": cpu_multiplies_bf16(),
        "rows": [{"dtype": dtype, "acc": mean(rows, "acc"), "acc_norm": mean(rows, "acc_norm"),
                  "seconds": round(seconds, 1), "seconds_per_item": round(seconds / len(rows), 4)}
                 for dtype, (rows, seconds) in scored.items()],
        "changed_items": {metric: sum(a[metric] != b[metric] for a, b in zip(fp32, bf16)) for metric in ("acc", "acc_norm")},
    }


def precision_table(section: dict) -> str:
    lines = [f"models/base through transformers in each dtype, on {section['items']:,} items (seed {section['seed']}, "
             f"{section['threads']} threads):", "",
             "| dtype | acc | acc_norm | s/item |", "|---|---|---|---|"]
    for row in section["rows"]:
        lines.append(f"| {row['dtype']} | {row['acc']:.2f} | {row['acc_norm']:.2f} | {row['seconds_per_item']:.3f} |")
    changed = section["changed_items"]
    lines += ["", f"bfloat16 changes the answer on {changed['acc']:,} items by acc and {changed['acc_norm']:,} "
                  f"by acc_norm, of {section['items']:,}."]
    return "\n".join(lines)


def table(report: dict) -> str:
    """README's table (README.md holds it between generated-by markers; tests/test_readme.py compares)."""
    data = report["data"]
    lines = [f"HellaSwag, zero-shot, {data['sampled']:,} of the {data['items_in_file']:,} validation items "
             f"(seed {data['seed']}, the same items for every row):", "",
             "| implementation | model | acc | acc_norm (per byte) | per token (llama.cpp's rule) | s/item |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        cells = [f"{row[k]:.2f}" if k in row else "–" for k in ("acc", "acc_norm", "acc_per_token")]
        lines.append(f"| {row['implementation']} | {row['model']} | " + " | ".join(cells) + f" | {row['seconds_per_item']:.3f} |")
    card = report["model_card"]
    lines.append(f"| model card ({card['harness']}) | {card['model']} | – | {card['hellaswag']:.1f} (published) | – | – |")
    lines += ["", "| item by item | same answer | different | points apart |", "|---|---|---|---|"]
    for name, a in report["agreement"].items():
        lines.append(f"| {name} | {a['same_items']:,} | {a['different_items']:,} | {a['points']:+.2f} |")
    guards = report["guards"]
    if guards:
        lines += ["", f"The general-ability guard at its default tolerance ({guards[0]['tolerance']:g}), each build paired with "
                      f"the {guards[0]['reference']} on the same {guards[0].get('items', '?')} items:", "",
                  "| build | size | acc_norm difference | 95 % interval | verdict |", "|---|---|---|---|---|"]
        for guard in guards:
            lines.append(f"| {guard['label']} | {guard['size_bytes'] / 2**20:.0f} MiB | {guard['diff']:+.4f} | "
                         f"[{guard['interval'][0]:+.4f}, {guard['interval'][1]:+.4f}] | **{guard['status']}** |")
    if report.get("precision"):
        lines += ["", precision_table(report["precision"])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print README's table from the committed report")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", action="store_true",
                        help="measure only the float32-vs-bfloat16 section and write it into the committed report")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    if not HELLASWAG.exists():
        parser.error(f"{HELLASWAG} is absent: get hellaswag_val_full.txt (see docs/benchmarks.md#standard-benchmarks)")
    if args.precision:
        report = json.loads(OUT.read_text())
        report["precision"] = precision(args.items, args.seed, args.threads)
    else:
        report = {**measure(args.items, args.seed, args.threads), "precision": precision(args.items, args.seed, args.threads)}
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(OUT, stamp(report, script=__file__))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
