"""`make install` as a new user meets it: a fresh clone, and none of the caches a machine builds up (a new
FTQ_CACHE, so llama.cpp is downloaded and compiled again; a new TORCH_EXTENSIONS_DIR, so DeepSpeed's CPU
Adam compiles again; pip without its cache, so every package is fetched again from the index). Writes
reports/bench/install.json; run it with nothing else on the machine.

    .venv/bin/python bench/install.py                     # three installs, about ten minutes each on 2 cores
    .venv/bin/python bench/install.py --repeats 2 --extend  # two more, beside the report's earlier runs of
                                                            # the same install inputs
    .venv/bin/python bench/install.py --table             # the line docs/install.md and README show
    .venv/bin/python bench/install.py --repeats 1 --extend --pypi-only  # pip with no configuration at all
                                                            # (PIP_CONFIG_FILE=/dev/null, no PIP_* settings):
                                                            # every package from PyPI, as a user's plain pip

Each run records how pip was configured (`pip`): this machine's configuration holds a local wheel folder
(the CPU build of torch among others) and extra local indexes, which a user's machine does not have.
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


def fresh_env(scratch: Path, pypi_only: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "FTQ_", "PYTHON"))}
    if pypi_only:  # no configuration file and no PIP_* setting but the cache's: the index pip ships with
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    env.update(FTQ_CACHE=str(scratch / "ftq-cache"), TORCH_EXTENSIONS_DIR=str(scratch / "torch-extensions"),
               PIP_NO_CACHE_DIR="1", PATH=":".join(p for p in env["PATH"].split(":") if ".venv" not in p))
    return env


def pip_configuration(env: dict[str, str]) -> str:
    """What pip reads in `env`: `pip config list` (files and PIP_* variables), or that it reads nothing."""
    # the interpreter `make install` makes its venv with (Makefile PYTHON), not this bench's venv, whose own
    # pip.conf the fresh venv does not read
    listed = subprocess.run(["python3", "-m", "pip", "config", "list"], env=env, capture_output=True,
                            text=True).stdout.strip()
    return "; ".join(listed.splitlines()) if listed else "none: PyPI only"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def same_install(rev: str) -> bool:
    """Whether commit `rev` installs from the same inputs as HEAD."""
    return subprocess.run(["git", "diff", "--quiet", rev, "HEAD", "--", *INSTALL_INPUTS], cwd=REPO).returncode == 0


PYPI_ONLY = "none: PyPI only"


def summary(runs: list[dict]) -> dict:
    """The median over the runs with this machine's pip configuration (the runs before `pip` was recorded had
    it), and apart from them the runs with PyPI alone (`pypi_only`)."""
    configured = [r for r in runs if r.get("pip") != PYPI_ONLY]
    plain = [r for r in runs if r.get("pip") == PYPI_ONLY]
    out = {"benchmark": "install", **spread(configured or plain), "goal_seconds": GOAL_SECONDS,
           "git_rev": runs[-1]["git_rev"], "runs": runs, "machine": runs[-1]["machine"], "caches": runs[-1]["caches"],
           "pip": (configured or plain)[-1].get("pip", "this machine's configuration (not recorded)"),
           "install_inputs": list(INSTALL_INPUTS)}
    if configured and plain:
        out["pypi_only"] = spread(plain)
    return out


def spread(runs: list[dict]) -> dict:
    seconds = sorted(r["seconds"] for r in runs)
    median = statistics.median(seconds)
    return {"seconds": round(median, 1), "repeats": len(runs), "spread": round((seconds[-1] - seconds[0]) / median, 3)}


# where each part of `make install` starts and ends: the first line make echoes that contains the text
# (make prints each recipe line as it starts it; the two jobs' lines interleave)
MARKS = {
    "packages": ("-m pip install --quiet \"torch", "ftq.training.deepspeed_ops"),
    "cpu_adam": ("ftq.training.deepspeed_ops", "touch .venv/.ftq-packages"),
    "llama_cpp_download": ("pip download --quiet --no-deps --no-binary", "building llama.cpp"),
    "llama_cpp_build": ("building llama.cpp", ".built"),
    "link_and_smoke": ("--force-reinstall", None),
}


def phases(timeline: list[tuple[float, str]], seconds: float) -> dict[str, float]:
    """Each part's seconds, from the time-stamped lines of make's output (None: a mark never printed)."""
    def first(text: str | None) -> float | None:
        if text is None:
            return seconds
        return next((t for t, line in timeline if text in line), None)

    out = {}
    for name, (begin, end) in MARKS.items():
        start, stop = first(begin), first(end)
        out[name] = None if start is None or stop is None else round(stop - start, 1)
    return out


def timed_lines(command: list[str], **kwargs) -> tuple[int, list[tuple[float, str]], float]:
    """Run a command, stamping each output line with the seconds since its start."""
    start = time.monotonic()
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs) as proc:
        for line in proc.stdout:
            if not line.startswith("WARNING: Location"):  # pip's note on each index folder this machine lacks
                lines.append((round(time.monotonic() - start, 1), line.rstrip()[:200]))
    return proc.returncode, lines, time.monotonic() - start


def measure(pypi_only: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="ftq-install-") as scratch:
        clone = Path(scratch) / "ftq"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        env = fresh_env(Path(scratch), pypi_only)
        pip = pip_configuration(env)
        returncode, timeline, seconds = timed_lines(["make", "install"], cwd=clone, env=env)
        if returncode:
            sys.exit(f"make install failed ({returncode}):\n" + "\n".join(line for _, line in timeline[-60:]))
        # what was installed: the local wheel folder and PyPI give different builds (torch's CPU one or not)
        frozen = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-m", "pip", "freeze"], env=env,
                                capture_output=True, text=True).stdout.splitlines()
    return {"seconds": round(seconds, 1), "git_rev": rev, "pip": pip, "installed": frozen,
            "phases": phases(timeline, seconds),
            "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform()},
            "caches": "none: new FTQ_CACHE and TORCH_EXTENSIONS_DIR, PIP_NO_CACHE_DIR=1, a fresh clone",
            "timeline": timeline}


def table(report: dict) -> str:
    minutes, seconds = divmod(round(report["seconds"]), 60)
    runs = [r for r in report.get("runs") or [report] if r.get("pip") != PYPI_ONLY] or report["runs"]
    each = ", ".join(f"{r['seconds']:.0f}" for r in runs)
    spread = f" (median of {len(runs)}: {each} s)" if len(runs) > 1 else ""
    line = (f"`make install` on a fresh clone with no caches: {report['seconds']:.0f} s ({minutes} min {seconds} s)"
            f"{spread} on {report['machine']['cpu_count']} cores ({report['machine']['cpu']}), commit {report['git_rev']}.")
    parts = median_phases(runs)
    if parts:
        line += (f" Its parts (median): the Python packages {parts['packages']:.0f} s, then DeepSpeed's CPU Adam "
                 f"{parts['cpu_adam']:.0f} s, while llama.cpp downloads ({parts['llama_cpp_download']:.0f} s) and "
                 f"builds ({parts['llama_cpp_build']:.0f} s); then linking and the smoke test "
                 f"{parts['link_and_smoke']:.0f} s.")
    line += f" pip's configuration: {report.get('pip', 'not recorded')}."
    if "pypi_only" in report:
        plain = report["pypi_only"]
        torch = next((p for r in report["runs"] if r.get("pip") == PYPI_ONLY for p in r.get("installed", [])
                      if p.startswith("torch==")), "torch (not recorded)")
        line += (f" With pip reading no configuration (every package from PyPI, as a plain pip fetches them, "
                 f"{torch} among them): {plain['seconds']:.0f} s ({plain['repeats']} run"
                 f"{'s' if plain['repeats'] > 1 else ''}).")
    return line


def median_phases(runs: list[dict]) -> dict[str, float] | None:
    """Each part's median over the runs that recorded every part (None: no run did)."""
    timed = [r["phases"] for r in runs if r.get("phases") and None not in r["phases"].values()]
    return {name: statistics.median(p[name] for p in timed) for name in MARKS} if timed else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the docs' line from the committed report")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extend", action="store_true",
                        help="keep the report's earlier runs whose commit has the same install inputs as HEAD")
    parser.add_argument("--pypi-only", action="store_true",
                        help="pip with no configuration (PIP_CONFIG_FILE=/dev/null, no PIP_* variables)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    runs = []
    if args.extend and OUT.exists():
        previous = json.loads(OUT.read_text())
        runs = [r for r in previous.get("runs") or [previous] if same_install(r["git_rev"])]
        runs = [{k: r[k] for k in ("seconds", "git_rev", "pip", "installed", "phases", "machine", "caches", "timeline")
                 if k in r}
                for r in runs]
    for repeat in range(args.repeats):
        runs.append(measure(args.pypi_only))
        print(f"run {len(runs)}: {runs[-1]['seconds']} s", file=sys.stderr, flush=True)
        # a run stopped midway leaves the last report whole
        atomic_write_json(OUT, stamp(summary(runs), script=__file__))
    print(table(summary(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
