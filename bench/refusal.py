"""A realistic bad build refused by the promotion rule through the real pipeline (issue 41).

q4_0 with its output matrix in Q4_0 too (no importance matrix), and q2_k, each made from the demo's merged
model. Both fail the quantize screen at its default limits, so the pipeline never evaluates them; here the
screen is switched off for that one build (`quantize.builds.<name>.check`), and the default promotion rule
alone has to refuse it. In a clone of the project that shares this project's DVC cache (the demo's base,
fine-tune, merge, reference and importance matrix are reused, nothing is retrained), README's documented
experiment command runs the pipeline:

    ftq run --exp -S 'quantize.enabled=[q8_0,<bad>]' -S '+quantize.builds.<bad>.check={...}'

and the ladder walks q8_0, then the bad build, by the default policy; a third experiment walks q8_0 and
q4_0 with the policy on the teacher-forced KL divergence from merged (`promote.policy.metric=forced_kld`,
`direction=min`) at the default margin. Writes reports/bench/refusal.json (the
walk, each test, the pick and the champion note from the clone's reports/ladder.json and promotion.json):

    .venv/bin/python bench/refusal.py            # after `make demo`
    .venv/bin/python bench/refusal.py --table
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

OUT = ROOT / "reports" / "bench" / "refusal.json"
NO_SCREEN = "{max_kld_mean: 100.0, max_kld_p99: 1000.0, min_top1_agreement: 0.0}"
# the builds as params.yaml defines them (q4_0: output in Q4_0, no importance matrix; q2_k: with it), the
# screen switched off for them alone (`+`: a key the build's block does not have yet, in DVC's override syntax)
BAD = {"q4_0": f"+quantize.builds.q4_0.check={NO_SCREEN}", "q2_k": f"+quantize.builds.q2_k.check={NO_SCREEN}"}
# the policy on a teacher-forced metric (ftq.evaluation.forced) at the default margin, 0.05 nats per answer token
FORCED_KLD = ["-S", "promote.policy.metric=forced_kld", "-S", "promote.policy.direction=min"]
# each experiment: (the bad build, the policy's overrides beside the default one)
EXPERIMENTS = [("q4_0", []), ("q2_k", []), ("q4_0", FORCED_KLD)]


def experiment(project: Path, bad: str, policy: list[str]) -> dict:
    from preference import run

    run([sys.executable, "-m", "dvc", "checkout", "-q"], project)  # every output of the demo, from the cache
    started = time.time()
    log = run([sys.executable, "-m", "ftq", "run", "--exp", "-S", f"quantize.enabled=[q8_0,{bad}]",
               "-S", BAD[bad], *policy, "--name", f"refuse-{bad}"], project)
    for stage in ("train", "merge"):
        if f"Stage '{stage}' didn't change, skipping" not in log:
            raise SystemExit(f"stage {stage} ran again in the clone: not the demo's model\n{log[-3000:]}")
    ladder = json.loads((project / "reports" / "ladder.json").read_text())
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    rungs = {r["name"]: r for r in ladder["rungs"]}
    return {"bad": bad, "options": BAD[bad], "policy": " ".join(policy[1::2]), "metric": ladder["metric"],
            "walk": ladder["walk"],
            "tests": {name: rungs[name].get("test") for name in ladder["walk"]["order"]},
            "screen": {name: {k: rungs[name][k] for k in ("kld_mean", "kld_p99", "top1_agreement")}
                       for name in rungs},
            "champion_note": promotion["champion"]["note"], "seconds": round(time.time() - started, 1)}


def measure() -> dict:
    from preference import clone

    rows = []
    for bad, policy in EXPERIMENTS:
        with tempfile.TemporaryDirectory() as folder:
            project = clone(Path(folder))
            rows.append(experiment(project, bad, policy))
            print(json.dumps(rows[-1]["walk"]), flush=True)
    return {"experiments": rows}


def table(report: dict) -> str:
    from guard import cell  # one test in a cell, as guard's table writes it

    lines = ["| experiment | policy's metric | build tested | screen's KLD mean | metric vs merged | HellaSwag vs merged "
             "| outcome |", "|---|---|---|---|---|---|---|"]
    for row in report["experiments"]:
        metric = row.get("metric", "task_json_field_accuracy")
        for name in row["walk"]["order"]:
            test = row["tests"].get(name) or {}
            lines.append(f"| q8_0, then {row['bad']} (screen off) | {metric} | {name} | "
                         f"{row['screen'][name]['kld_mean']:.3f} | {cell(test.get('metric_test'))} | "
                         f"{cell(test.get('general_guard'))} | {test.get('outcome', 'not tested')} |")
        lines.append(f"| | | **shipped: {row['walk']['pick']}** | | | | |")
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
