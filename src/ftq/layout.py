"""Where the stages' outputs lie, relative to the project root: the one place stages share, so that a stage
reads another stage's outputs by these names and never imports the other stage (dvc.yaml lists the same
paths as each stage's deps and outs)."""

from __future__ import annotations

import json
from pathlib import Path

EVAL_ROOT = Path("reports/eval")             # base's and merged's evaluations (stages evaluate_*)
BUILDS_ROOT = EVAL_ROOT / "builds"            # every build's evaluation (stage ladder)
REFERENCE_CANDIDATES = ("base", "merged")
QUANTIZE_REPORTS = Path("reports/quantize")   # <build>.json (stage quantize)
QUANTIZED = Path("models/quantized")          # <build>/manifest.json and the artifact
LADDER = Path("reports/ladder.json")          # the walk (stage ladder)
PROMOTION = Path("reports/promotion.json")    # the decision (stage promote)
BENCHMARK_MANIFEST = Path("data/benchmarks.json")  # the standard tasks' local files (stage benchmark_data)
MACHINE = Path("data/machine.json")           # the arithmetic this machine computes in (stage machine)
# merged's distribution on the held-out answers and the token ids every candidate's teacher-forced scores use
# (stage evaluate_merged; ftq.evaluation.forced)
HELDOUT_REFERENCE = Path("models/reference_heldout")
# in preference.output_dir (stage preference): its settings, and the held-out pairs as it scored them
PREFERENCE_INFO = "ftq_preference.json"
PREFERENCE_REFERENCE_LOGPS = "reference_logps.jsonl"


def eval_dir(name: str) -> Path:
    """Where a candidate's evaluation lies: reports/eval for base and merged, reports/eval/builds for a build."""
    return EVAL_ROOT if name in REFERENCE_CANDIDATES else BUILDS_ROOT


def read_benchmark_manifest(root: Path) -> dict[str, dict]:
    """data/benchmarks.json, as stage benchmark_data wrote it."""
    path = root / BENCHMARK_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `dvc repro benchmark_data` (or `ftq benchmark-data`) first")
    return json.loads(path.read_text())
