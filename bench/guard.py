"""promote's general-ability guard on realistic bad builds of the demo's fine-tune, at its default tolerance.

    .venv/bin/python bench/guard.py            # after `make demo` (needs models/adapter and merged's reports)
    .venv/bin/python bench/guard.py --table    # README's table, from the committed report

A real quantization does not hurt HellaSwag on the demo's model: bench/benchmarks.py measures q4_0 with its
output matrix in Q4_0 and q2_k (on SmolLM2's 576-wide rows every sub-4-bit type falls back to a 4-bit one)
within 0.4 points of F16. So the bad builds here are merge mistakes that do happen, each made into a q8_0
GGUF the way the quantize stage makes one:
- the adapter merged twice (onto models/merged instead of models/base): W + 2 dW;
- the adapter merged with rsLoRA's scale, alpha / sqrt(r), when it was trained with LoRA's alpha / r:
  W + sqrt(r) dW (4x at the demo's rank 16).
Each is judged by all three of the pipeline's gates, each on its own and with its default limits: the
quantize check (KL divergence from merged on the held-out answers), task retention (the paired interval on
the task metric) and the general-ability guard (paired HellaSwag acc_norm difference vs merged on
evaluate's sample, the same items merged was scored on by the pipeline). The demo's own enabled builds,
judged by the pipeline (reports/promotion.json), are the baseline. Writes reports/bench/guard.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OUT = ROOT / "reports" / "bench" / "guard.json"


def bad_merges(rank: int) -> list[dict]:
    return [{"label": "adapter merged twice (onto merged, not base)", "scale": 2.0},
            {"label": f"rsLoRA scale on a LoRA adapter (alpha/sqrt(r): {math.sqrt(rank):g}x at r={rank})",
             "scale": math.sqrt(rank)}]


def merge_scaled(base: Path, adapter: Path, scale: float, out: Path) -> None:
    """base + scale x the adapter's update, saved as an HF folder (the merge stage's format)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.scaling[name] *= scale
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def judged(params: dict, folder: Path, name: str, work: Path) -> dict:
    """The three gates' verdicts on one GGUF build, each computed as its pipeline stage computes it."""
    from ftq import schema
    from ftq.evaluation import harness, paired, task
    from ftq.quantize.distance import load as load_reference
    from ftq.runtimes import open_model
    from ftq.promotion.candidates import read_merged
    from ftq.promotion.policy import Candidate, judge, policy_of
    from ftq.stages import benchmark_data, evaluate, quantize

    root = ROOT
    check_cfg = schema.settings(params, "quantize")["check"]
    reference = load_reference(root / "models" / "reference")
    check = quantize.check_build(folder / "model.gguf", reference, check_cfg, reference.meta["reply"])
    cfg = schema.settings(params, "evaluate")
    plan = harness.plan(cfg["lm_eval"], root, "params.yaml", benchmark_data.load(root))
    runtime = open_model(folder / "model.gguf", n_ctx=2048)
    try:
        rows = evaluate.answer_all(runtime, evaluate.task_examples(root, cfg), int(cfg["max_new_tokens"]))
        harness.run(runtime, name, plan, work)
    finally:
        runtime.close()
    answers = work / f"{name}.answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = policy_of(params)
    metrics = {f"task_{k}": v for k, v in task.aggregate(rows).items()}
    candidate = Candidate(name, manifest={"check": {"passed": True}, "size_bytes": (folder / "model.gguf").stat().st_size},
                          metrics=metrics, scores=paired.load_scores(answers),
                          benchmark_rows=evaluate.read_samples(work / f"{name}.samples.jsonl"))
    merged = read_merged(root, policy["metric"])
    verdict = judge(candidate, merged, policy)  # the check is reported apart, so judge skips it
    reasons, kept, guard = verdict.reasons, verdict.retention, verdict.general_guard
    return {"size_bytes": candidate.size_bytes,
            "quantize_check": {"passed": check["passed"], "failures": check["failures"],
                               **{k: check[k] for k in ("kld_mean", "kld_p99", "top1_agreement")}},
            "task": {"metric": policy["metric"], "value": metrics[policy["metric"]],
                     "merged": merged.metrics[policy["metric"]], "retention": kept["ratio"],
                     "interval": kept["interval"], "min_retention": policy["min_retention"],
                     "status": "rejected" if kept["interval"][1] < policy["min_retention"] else "pass"},
            "general_guard": guard, "promote_reasons": reasons}


def baseline(root: Path) -> list[dict]:
    """The pipeline's own verdicts on the demo's builds (reports/promotion.json), not recomputed."""
    report = json.loads((root / "reports" / "promotion.json").read_text())
    return [{"build": row["name"], "size_bytes": row.get("size_bytes"), "general_guard": row["general_guard"]}
            for row in report.get("candidates", []) if row.get("general_guard")]


def measure() -> dict:
    from ftq.params import load_params
    from ftq.quantize import gguf

    params = load_params(ROOT / "params.yaml")
    rank = int(json.loads((ROOT / "models" / "adapter" / "adapter_config.json").read_text())["r"])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for n, bad in enumerate(bad_merges(rank)):
            started = time.perf_counter()
            merged = work / f"merged_{n}"
            merge_scaled(ROOT / "models" / "base", ROOT / "models" / "adapter", bad["scale"], merged)
            build = work / f"bad_{n}"
            build.mkdir()
            gguf.build(merged, build, gguf.validate({"type": "q8_0"}, "bench"))
            rows.append({**bad, "type": "q8_0", **judged(params, build, f"bad_{n}", work),
                         "seconds": round(time.perf_counter() - started, 1)})
    return {"builds": rows, "baseline": baseline(ROOT)}


def table(report: dict) -> str:
    lines = ["| build | size | quantize check (KLD mean, top-1) | task retention [95 % interval] | "
             "HellaSwag acc_norm vs merged [95 % interval] | guard |", "|---|---|---|---|---|---|"]
    for row in report["builds"]:
        check, kept, guard = row["quantize_check"], row["task"], row["general_guard"]
        lines.append(
            f"| {row['label']}, {row['type']} | {row['size_bytes'] / 2**20:.0f} MiB | "
            f"{'pass' if check['passed'] else 'fail'} ({check['kld_mean']:.3f}, {100 * check['top1_agreement']:.1f} %) | "
            f"{kept['status']}: {100 * kept['retention']:.1f} % [{100 * kept['interval'][0]:.1f}, "
            f"{100 * kept['interval'][1]:.1f}] | {guard['diff']:+.4f} [{guard['interval'][0]:+.4f}, "
            f"{guard['interval'][1]:+.4f}] | **{guard['status']}** |")
    for row in report["baseline"]:
        guard = row["general_guard"]
        if "diff" in guard:
            size = f"{row['size_bytes'] / 2**20:.0f} MiB" if row.get("size_bytes") else "–"
            lines.append(f"| {row['build']} (the demo's build, judged by the pipeline) | {size} | pass | – | "
                         f"{guard['diff']:+.4f} [{guard['interval'][0]:+.4f}, {guard['interval'][1]:+.4f}] | "
                         f"**{guard['status']}** |")
    tolerance = report["builds"][0]["general_guard"]["tolerance"] if report["builds"] else None
    return "\n".join(lines + ["", f"Default limits throughout (guard tolerance {tolerance:g}: rejected when the "
                                  "whole interval lies below it)."])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print README's table from the committed report")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    for needed in ("models/adapter/adapter_config.json", "models/reference", "reports/eval/merged.json",
                   "reports/eval/lm_eval/merged.samples.jsonl", "reports/promotion.json"):
        if not (ROOT / needed).exists():
            parser.error(f"{ROOT / needed} is missing: run `make demo` first")
    report = measure()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
