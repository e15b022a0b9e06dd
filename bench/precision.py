"""The demo's decision on a machine that computes in fp32 beside this one's (issue 41).

`train.precision: auto` trains in bf16 where the CPU multiplies it natively (AVX512-BF16, AMX) and in fp32
elsewhere (AMD Zen 3, ...), and `evaluate.lm_eval.dtype: auto` scores likewise, so the same `make demo`
makes another fine-tune on another machine kind. This runs the whole pipeline as such a machine would, in
a clone of the project that shares this project's DVC cache (base and prepare reused; train and every
stage after it run again), with ftq's experiment command:

    ftq run --exp -S train.precision=fp32 -S evaluate.lm_eval.dtype=float32

and sets its ladder walk and champion beside the project's own (reports/ladder.json, reports/promotion.json,
which must be this commit's). Writes reports/bench/precision.json:

    .venv/bin/python bench/precision.py            # after `make demo`; about the demo's time
    .venv/bin/python bench/precision.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

OUT = ROOT / "reports" / "bench" / "precision.json"
FP32 = ["-S", "train.precision=fp32", "-S", "evaluate.lm_eval.dtype=float32"]


def decision(project: Path) -> dict:
    """A project's precision, merged's metric, the walk with each test, and the champion note."""
    ladder = json.loads((project / "reports" / "ladder.json").read_text())
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    train = json.loads((project / "reports" / "train.json").read_text())
    rungs = {r["name"]: r for r in ladder["rungs"]}
    return {"precision": train.get("precision"), "commit": ladder.get("provenance", {}).get("commit"),
            "metric": ladder["metric"], "merged_metric": ladder["merged_metric"],
            "merged_metric_examples": ladder["merged_metric_examples"], "walk": ladder["walk"],
            "tests": {name: rungs[name].get("test") for name in ladder["walk"]["order"]},
            "champion_note": promotion["champion"]["note"]}


def measure() -> dict:
    import subprocess

    from preference import clone, run

    here = decision(ROOT)
    # the project's decision must be HEAD's code and settings (its outputs may be committed after it)
    changed = subprocess.run(["git", "diff", "--quiet", here["commit"], "HEAD", "--", "src", "params.yaml", "dvc.yaml"],
                             cwd=ROOT).returncode
    if changed:
        raise SystemExit(f"reports/ladder.json is of commit {here['commit']}, whose code or settings differ from "
                         "HEAD's: `make demo` first")
    if here["precision"] == "fp32":
        raise SystemExit("this machine trains in fp32 already: the comparison would be the same run twice")
    with tempfile.TemporaryDirectory() as folder:
        project = clone(Path(folder))
        started = time.time()
        log = run([sys.executable, "-m", "ftq", "run", "--exp", *FP32, "--name", "fp32"], project)
        if "Running stage 'train'" not in log:
            raise SystemExit(f"train did not run again at fp32 in the clone\n{log[-3000:]}")
        fp32 = {**decision(project), "seconds": round(time.time() - started, 1)}
    return {"overrides": " ".join(FP32), "this_machine": here, "fp32": fp32,
            "same_pick": here["walk"]["pick"] == fp32["walk"]["pick"]}


def table(report: dict) -> str:
    from guard import cell  # one test in a cell, as guard's table writes it

    lines = ["| run | train precision | merged's metric | build tested | metric vs merged | HellaSwag vs merged "
             "| outcome |", "|---|---|---|---|---|---|---|"]
    for label, row in (("this machine (`make demo`)", report["this_machine"]), (f"`{report['overrides']}`",
                                                                               report["fp32"])):
        for name in row["walk"]["order"]:
            test = row["tests"].get(name) or {}
            lines.append(f"| {label} | {row['precision']} | {row['merged_metric']} ({row['merged_metric_examples']} "
                         f"examples) | {name} | {cell(test.get('metric_test'))} | {cell(test.get('general_guard'))} | "
                         f"{test.get('outcome', 'not tested')} |")
        lines.append(f"| | | | **shipped: {row['walk']['pick']}** | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the docs table from the committed report")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    report = stamp(measure(), script=__file__)
    atomic_write_json(OUT, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
