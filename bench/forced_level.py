"""The level and power of the non-inferiority test on `forced_kld`, by simulation on the demo's own
per-example divergences (issue 41).

A per-example KL divergence is non-negative and skewed: a few examples hold most of it. The policy tests
its mean with a BCa bootstrap (ftq.evidence.non_inferiority), whose level is approximate, and too lenient
where the data are skewed and the examples few. This measures it where it matters: the shape is the demo
pick's own rows (reports/eval/builds/<pick>.forced.jsonl, merged's rows are 0), rescaled so that the true
mean divergence is exactly the margin (the rate at which such a build is declared faithful is the test's
real level, against the nominal 1 - confidence) or half of it (the power), examples drawn with replacement,
`--repeats` times at each size. Writes reports/bench/forced_level.json:

    .venv/bin/python bench/forced_level.py          # after `make demo`; a few minutes
    .venv/bin/python bench/forced_level.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OUT = ROOT / "reports" / "bench" / "forced_level.json"
SIZES = (40, 80, 200, 400, 1000)


def pick_rows() -> tuple[str, np.ndarray]:
    ladder = json.loads((ROOT / "reports" / "ladder.json").read_text())
    pick = ladder["walk"]["pick"]
    rows = [json.loads(line) for line in (ROOT / "reports" / "eval" / "builds" / f"{pick}.forced.jsonl").open()]
    return pick, np.array([r["kld"] for r in rows], dtype=float)


def rate(shape: np.ndarray, mean: float, n: int, margin: float, confidence: float, repeats: int, seed: int) -> float:
    """Share of simulated builds declared faithful: n examples drawn from `shape` rescaled to `mean`."""
    from ftq import evidence

    rng = np.random.default_rng(seed)
    values = shape * (mean / shape.mean())
    faithful = 0
    for repeat in range(repeats):
        build = rng.choice(values, size=n, replace=True)
        test = evidence.non_inferiority(build, np.zeros(n), margin, confidence, lower_is_better=True,
                                        seed=repeat, bounds=False, resamples=1999)
        faithful += test["outcome"] == evidence.FAITHFUL
    return faithful / repeats


def measure(repeats: int) -> dict:
    pick, kld = pick_rows()
    params = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())
    policy = params["promote"]["policy"]
    margin, confidence = float(policy["margin"]), float(policy["confidence"])
    skew = float(((kld - kld.mean()) ** 3).mean() / kld.std() ** 3)
    rows = [{"examples": n, "level": rate(kld, margin, n, margin, confidence, repeats, 0),
             "power_at_half_margin": rate(kld, margin / 2, n, margin, confidence, repeats, 1)} for n in SIZES]
    return {"pick": pick, "shape": {"examples": len(kld), "mean": float(kld.mean()), "median": float(np.median(kld)),
                                    "max": float(kld.max()), "skewness": skew},
            "margin": margin, "confidence": confidence, "nominal_level": round(1 - confidence, 4),
            "repeats": repeats, "monte_carlo_se_at_nominal": round(float(np.sqrt(0.05 * 0.95 / repeats)), 4),
            "resamples": 1999, "sizes": rows}


def table(report: dict) -> str:
    shape = report["shape"]
    lines = [f"Shape: {report['pick']}'s {shape['examples']} per-example divergences (mean {shape['mean']:.4f}, "
             f"median {shape['median']:.4f}, max {shape['max']:.4f}, skewness {shape['skewness']:.1f}), rescaled; "
             f"margin {report['margin']:g} nats, nominal level {report['nominal_level']:g}, {report['repeats']} "
             f"simulated builds per cell (Monte Carlo standard error {report['monte_carlo_se_at_nominal']:g} at the "
             "nominal level).", "",
             "| held-out examples | declared faithful, true mean = margin (the real level) | declared faithful, true "
             "mean = half the margin (power) |", "|---|---|---|"]
    for row in report["sizes"]:
        lines.append(f"| {row['examples']} | {100 * row['level']:.1f} % | {100 * row['power_at_half_margin']:.1f} % |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the docs table from the committed report")
    parser.add_argument("--repeats", type=int, default=1000)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    report = stamp(measure(args.repeats), script=__file__)
    atomic_write_json(OUT, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
