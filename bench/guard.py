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
Beside them, the realistic bad quantizations: q4_0 with its output matrix in Q4_0 (no importance matrix)
and q2_k (with it), made from models/merged as the quantize stage makes them.
Each is judged by all three of the pipeline's gates, each on its own and with its default limits: the
quantize check (KL divergence from merged on the held-out answers), non-inferiority on the task metric at
promote.policy.margin and the general-ability guard (non-inferiority on HellaSwag acc_norm at its
tolerance, on evaluate's sample, the same items merged was scored on by the pipeline), with the pipeline's
own code (ftq.promotion.policy.judge). The demo's own builds, judged by the pipeline
(reports/promotion.json and reports/ladder.json), are the baseline. Writes reports/bench/guard.json.
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
    from ftq import layout, schema
    from ftq.evaluation import candidate as evaluate
    from ftq.evaluation import harness, task
    from ftq.quantize.distance import load as load_reference
    from ftq.runtimes import open_model
    from ftq.promotion.candidates import load_scores, read_merged
    from ftq.promotion.policy import Candidate, judge, policy_of
    from ftq.stages import quantize

    root = ROOT
    check_cfg = schema.settings(params, "quantize")["check"]
    reference = load_reference(root / "models" / "reference")
    check = quantize.check_build(folder / "model.gguf", reference, check_cfg, reference.meta["reply"])
    cfg = schema.settings(params, "evaluate")
    plan = harness.plan(cfg["lm_eval"], root, "params.yaml", layout.read_benchmark_manifest(root))
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
                          metrics=metrics, scores=load_scores(answers),
                          benchmark_rows=evaluate.read_samples(work / f"{name}.samples.jsonl"))
    merged = read_merged(root, policy["metric"])
    verdict = judge(candidate, merged, policy)  # the check is reported apart, so judge skips it
    return {"size_bytes": candidate.size_bytes,
            "quantize_check": {"passed": check["passed"], "failures": check["failures"],
                               **{k: check[k] for k in ("kld_mean", "kld_p99", "top1_agreement")}},
            "task": {"metric": policy["metric"], "value": metrics[policy["metric"]],
                     "merged": merged.metrics[policy["metric"]], **test_summary(verdict.metric_test)},
            "general_guard": test_summary(verdict.general_guard), "promote_reasons": verdict.reasons,
            "shipped_by_the_policy": check["passed"] and verdict.passes}


def test_summary(test: dict | None) -> dict | None:
    from ftq.promotion.report import test_summary as summary

    return summary(test)


def baseline(root: Path) -> list[dict]:
    """The pipeline's own verdicts on the demo's builds (its walk's tests, reports/ladder.json), not recomputed."""
    ladder = json.loads((root / "reports" / "ladder.json").read_text())
    return [{"build": r["name"], "size_bytes": r["size_bytes"], "task": r["test"]["metric_test"],
             "general_guard": r["test"].get("general_guard"), "outcome": r["test"]["outcome"]}
            for r in ladder.get("rungs", []) if r.get("test")]


def bad_quantizations() -> list[dict]:
    return [{"label": "q4_0, output matrix in Q4_0, no importance matrix",
             "options": {"type": "q4_0", "output_type": "q4_0", "imatrix": False}},
            {"label": "q2_k, with the importance matrix", "options": {"type": "q2_k"}}]


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
        for n, bad in enumerate(bad_quantizations()):
            started = time.perf_counter()
            build = work / f"quant_{n}"
            build.mkdir()
            options = gguf.validate(dict(bad["options"]), "bench")
            imatrix = None if bad["options"].get("imatrix") is False else ROOT / "models" / "imatrix" / "imatrix.gguf"
            gguf.build(ROOT / "models" / "merged", build, options, imatrix=imatrix)
            rows.append({"label": bad["label"], "type": bad["options"]["type"],
                         **judged(params, build, f"quant_{n}", work), "seconds": round(time.perf_counter() - started, 1)})
    return {"builds": rows, "baseline": baseline(ROOT)}


def cell(test: dict | None) -> str:
    if not test:
        return "–"
    if test.get("outcome") == "absent":
        return "absent (fails closed)"
    margin = test.get("tolerance", test.get("margin"))
    return (f"{test['outcome']}: {test['diff']:+.3f}, bound {test['lower']:+.3f} vs -{margin:g}, "
            f"p = {test['p_value']:.2g}, n = {test['examples']}")


def table(report: dict) -> str:
    lines = ["| build | size | quantize check (KLD mean, top-1) | task metric vs merged | "
             "HellaSwag acc_norm vs merged | shipped by the policy |", "|---|---|---|---|---|---|"]
    for row in report["builds"]:
        check = row["quantize_check"]
        lines.append(
            f"| {row['label']}, {row['type']} | {row['size_bytes'] / 2**20:.0f} MiB | "
            f"{'pass' if check['passed'] else 'fail'} ({check['kld_mean']:.3f}, {100 * check['top1_agreement']:.1f} %) | "
            f"{cell(row['task'])} | {cell(row['general_guard'])} | **{'yes' if row['shipped_by_the_policy'] else 'no'}** |")
    for row in report["baseline"]:
        size = f"{row['size_bytes'] / 2**20:.0f} MiB" if row.get("size_bytes") else "–"
        lines.append(f"| {row['build']} (the demo's build, tested in its walk) | {size} | pass | {cell(row['task'])} | "
                     f"{cell(row['general_guard'])} | {row['outcome']} |")
    return "\n".join(lines + ["", "Default limits throughout: promote.policy.margin on the task metric and "
                                  "general_guard.tolerance on HellaSwag, one-sided at promote.policy.confidence; "
                                  "a build ships only when shown within both."])


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
    from ftq.io import atomic_write_json
    from ftq.provenance import record

    report = measure()
    report["provenance"] = record(__file__)
    atomic_write_json(OUT, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
