"""Where a report came from. Every report (a stage's reports/*.json, a bench's reports/bench/*.json) records
the commit, the script, the sources, the package versions and the machine that produced it, so that every
figure can be traced to one state of the code: a report whose commit and sources hash differ from another's
was not made by the same code, and one marked dirty was made by code that no commit holds.

Cheap (well under a second: two short git calls, a hash of ftq's own .py files, package metadata and
/proc/cpuinfo) and never raises: what cannot be found (no git, no such package, no /proc) is None. Heavy
packages (torch, transformers, ...) are never imported: their versions come from their metadata."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from ftq.params import repo_root

# the paths whose changes make a report's numbers differ from what its commit would produce
CODE_PATHS = ("src", "bench", "params.yaml", "dvc.yaml")
# package name in a report -> its distribution's name
DISTRIBUTIONS = {
    "ftq": "ftq", "torch": "torch", "transformers": "transformers", "peft": "peft", "trl": "trl",
    "mlflow": "mlflow", "dvc": "dvc", "lm_eval": "lm_eval", "llama_cpp": "llama-cpp-python",
    "numpy": "numpy", "scipy": "scipy",
}
# the instruction sets that decide which kernels (and so which rounding) torch and llama.cpp use here
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
PACKAGE_DIR = Path(__file__).resolve().parent  # the ftq that runs (bin/ftq puts the workspace's src first)


def record(script: str | Path | None = None) -> dict[str, Any]:
    """The provenance of a report written now, by `script` (a bench's __file__) or by a stage (None)."""
    root = repo_root()
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--", *CODE_PATHS) if commit else None
    return {
        "commit": commit,
        # untracked files count too: code no commit holds is as unreproducible as edited code
        "dirty": None if status is None else bool(status),
        **_script(root, script),
        "sources_sha256": sources_sha256(),
        "versions": versions(),
        "machine": machine(),
    }


def stamp(report: dict[str, Any], script: str | Path | None = None) -> dict[str, Any]:
    """`report` with its provenance added (a new dict: the caller's report is left as it was)."""
    return {**report, "provenance": record(script)}


def _git(root: Path, *args: str) -> str | None:
    """git's output in `root`, or None where git is missing, fails or `root` is no repository."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _script(root: Path, script: str | Path | None) -> dict[str, Any]:
    if script is None:
        return {}
    path = Path(script).resolve()
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        digest = None
    return {"script": name, "script_sha256": digest}


def sources_sha256(package: Path = PACKAGE_DIR) -> str:
    """One sha256 over every .py file of the package: each file's path (relative, so the same code hashes
    the same in any checkout) and bytes, in sorted order (so the hash does not depend on the walk)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name, distribution in DISTRIBUTIONS.items():
        try:
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    model, flags = None, set()
    try:
        for line in cpuinfo.read_text().splitlines():  # the first processor's lines stand for all
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}
