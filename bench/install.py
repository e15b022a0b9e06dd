"""`make install` as a new user meets it: a fresh clone, and none of the caches a machine builds up (a new
FTQ_CACHE, so llama.cpp is downloaded and compiled again; a new TORCH_EXTENSIONS_DIR, so DeepSpeed's CPU
Adam compiles again; pip without its cache, so every package is fetched again from the index). Writes
reports/bench/install.json; run it with nothing else on the machine.

    .venv/bin/python bench/install.py                     # three installs, about ten minutes each on 2 cores
    .venv/bin/python bench/install.py --repeats 2 --extend  # two more, beside the report's earlier runs of
                                                            # the same install inputs
    .venv/bin/python bench/install.py --table             # the line docs/install.md and README show
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "reports" / "bench" / "install.json"
GOAL_SECONDS = 600
# what `make install` reads: a run at another commit measured the same install if these are unchanged
INSTALL_INPUTS = ("Makefile", "pyproject.toml", "vendor")


def fresh_env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "FTQ_", "PYTHON"))}
    env.update(FTQ_CACHE=str(scratch / "ftq-cache"), TORCH_EXTENSIONS_DIR=str(scratch / "torch-extensions"),
               PIP_NO_CACHE_DIR="1", PATH=":".join(p for p in env["PATH"].split(":") if ".venv" not in p))
    return env


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def same_install(rev: str) -> bool:
    """Whether commit `rev` installs from the same inputs as HEAD."""
    return subprocess.run(["git", "diff", "--quiet", rev, "HEAD", "--", *INSTALL_INPUTS], cwd=REPO).returncode == 0


def summary(runs: list[dict]) -> dict:
    seconds = sorted(r["seconds"] for r in runs)
    median = statistics.median(seconds)
    return {"benchmark": "install", "seconds": round(median, 1), "repeats": len(runs),
            "spread": round((seconds[-1] - seconds[0]) / median, 3), "goal_seconds": GOAL_SECONDS,
            "git_rev": runs[-1]["git_rev"], "runs": runs, "machine": runs[-1]["machine"], "caches": runs[-1]["caches"],
            "install_inputs": list(INSTALL_INPUTS)}


def measure() -> dict:
    with tempfile.TemporaryDirectory(prefix="ftq-install-") as scratch:
        clone = Path(scratch) / "ftq"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        start = time.monotonic()
        result = subprocess.run(["make", "install"], cwd=clone, env=fresh_env(Path(scratch)), capture_output=True, text=True)
        seconds = time.monotonic() - start
        if result.returncode:
            sys.exit(f"make install failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return {"seconds": round(seconds, 1), "git_rev": rev,
            "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform()},
            "caches": "none: new FTQ_CACHE and TORCH_EXTENSIONS_DIR, PIP_NO_CACHE_DIR=1, a fresh clone"}


def table(report: dict) -> str:
    minutes, seconds = divmod(round(report["seconds"]), 60)
    runs = report.get("runs") or [report]
    each = ", ".join(f"{r['seconds']:.0f}" for r in runs)
    spread = f" (median of {len(runs)}: {each} s)" if len(runs) > 1 else ""
    return (f"`make install` on a fresh clone with no caches: {report['seconds']:.0f} s ({minutes} min {seconds} s)"
            f"{spread} on {report['machine']['cpu_count']} cores ({report['machine']['cpu']}), commit {report['git_rev']}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the docs' line from the committed report")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extend", action="store_true",
                        help="keep the report's earlier runs whose commit has the same install inputs as HEAD")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    from ftq.io import atomic_write_json

    runs = []
    if args.extend and OUT.exists():
        previous = json.loads(OUT.read_text())
        runs = [r for r in previous.get("runs") or [previous] if same_install(r["git_rev"])]
        runs = [{k: r[k] for k in ("seconds", "git_rev", "machine", "caches")} for r in runs]
    for repeat in range(args.repeats):
        runs.append(measure())
        print(f"run {len(runs)}: {runs[-1]['seconds']} s", file=sys.stderr, flush=True)
        atomic_write_json(OUT, summary(runs))  # a run stopped midway leaves the last report whole
    print(table(summary(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
