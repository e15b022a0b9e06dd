"""`make install` as a new user meets it: a fresh clone, and none of the caches a machine builds up (a new
FTQ_CACHE, so llama.cpp is downloaded and compiled again; a new TORCH_EXTENSIONS_DIR, so DeepSpeed's CPU
Adam compiles again; pip without its cache, so every package is fetched again from the index). Writes
reports/bench/install.json; run it with nothing else on the machine.

    .venv/bin/python bench/install.py            # about ten minutes on 2 cores
    .venv/bin/python bench/install.py --table    # the line docs/install.md and README show, from the report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "reports" / "bench" / "install.json"
GOAL_SECONDS = 600


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
    return {"benchmark": "install", "seconds": round(seconds, 1), "goal_seconds": GOAL_SECONDS, "git_rev": rev,
            "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform()},
            "caches": "none: new FTQ_CACHE and TORCH_EXTENSIONS_DIR, PIP_NO_CACHE_DIR=1, a fresh clone"}


def table(report: dict) -> str:
    minutes, seconds = divmod(round(report["seconds"]), 60)
    return (f"`make install` on a fresh clone with no caches: {report['seconds']:.0f} s ({minutes} min {seconds} s) "
            f"on {report['machine']['cpu_count']} cores ({report['machine']['cpu']}), commit {report['git_rev']}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the docs' line from the committed report")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    from ftq.io import atomic_write_json

    report = measure()
    atomic_write_json(OUT, report)  # a run stopped midway leaves the last report whole
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
