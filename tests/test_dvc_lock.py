"""dvc.lock records the md5 of each stage's dependencies as they were when the stage last ran. Where a code
dependency (under src/, bench/ or bin/) differs from this checkout's, the stage's outputs and reports were
made by other code than this, and a figure taken from them belongs to no state of the code. The fix is to
rerun the stage (`dvc repro`): recording the new md5s without rerunning would leave the old code's outputs
standing under the new code's name.

The md5s are DVC's own (dvc_data's build, honouring .dvcignore): a file's is the md5 of its bytes, a
folder's the md5 of the JSON listing of its files' md5s, with ".dir" appended. No DVC process runs: the
lock is read as YAML, and dvc.yaml's stages come from DVC's own resolver, in this process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from conftest import REPO

CODE_DIRS = ("src/", "bench/", "bin/")


def dvc_md5s(root: Path, paths: set[str]) -> dict[str, str | None]:
    """The md5 DVC would record now for each path (relative to root); None for a path that is gone."""
    from dvc.fs import localfs
    from dvc.ignore import DvcIgnoreFilter
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem

    ignore = DvcIgnoreFilter(localfs, str(root))
    staging = HashFileDB(MemoryFileSystem(), "/ftq-test-dvc-lock")  # build keeps a folder's listing here
    md5s: dict[str, str | None] = {}
    for path in sorted(paths):
        if not (root / path).exists():
            md5s[path] = None
            continue
        _, _, built = build(staging, str(root / path), localfs, "md5", ignore=ignore, dry_run=True)
        md5s[path] = built.hash_info.value
    return md5s


def dvc_yaml_stages(root: Path) -> dict[str, list[str]]:
    """Each stage dvc.yaml defines, with its deps, as DVC resolves them (foreach, vars): a dvc.lock entry of
    a stage dvc.yaml no longer defines is no output's record, and `dvc repro` neither reads nor removes it."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.addressing: [str(dep.def_path) for dep in stage.deps] for stage in repo.index.stages}


def stale_code_deps(root: Path, stages: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each of `stages` (name -> deps) whose code dependencies are not what dvc.lock recorded at its last run:
    a file or folder changed or gone, a dep added or dropped since, or no run at all; why, path by path."""
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    recorded = {stage: {dep["path"]: dep.get("md5") for dep in locked.get(stage, {}).get("deps", [])
                        if dep["path"].startswith(CODE_DIRS)} for stage in stages}
    listed = {stage: {path for path in deps if path.startswith(CODE_DIRS)} for stage, deps in stages.items()}
    now = dvc_md5s(root, set().union(*recorded.values(), *listed.values()))
    stale: dict[str, list[str]] = {}
    for stage in stages:
        paths = sorted(set(recorded[stage]) | listed[stage])
        why = ["never ran: not in dvc.lock"] if stage not in locked else \
            [w for path in paths if (w := mismatch(path, recorded[stage], listed[stage], now))]
        if why:
            stale[stage] = why
    return stale


def mismatch(path: str, recorded: dict[str, str | None], listed: set[str], now: dict[str, str | None]) -> str | None:
    if path not in recorded:
        return f"{path} (a dep in dvc.yaml, not in dvc.lock)"
    if path not in listed:
        return f"{path} (in dvc.lock, no longer a dep in dvc.yaml)"
    if now[path] != recorded[path]:
        return f"{path} (dvc.lock {recorded[path]}, now {now[path] or 'gone'})"
    return None


def stale_message(stale: dict[str, list[str]]) -> str:
    lines = [f"  {stage}: " + "; ".join(paths) for stage, paths in stale.items()]
    return ("dvc.lock is stale: these stages' outputs were not made by this checkout's code:\n" + "\n".join(lines) + "\nRerun them so that every output comes from this "
            "code: `dvc repro` (or `dvc repro <stage>` for each above), then commit dvc.lock with the code.")


def test_dvc_lock_records_the_code_in_this_checkout():
    stale = stale_code_deps(REPO, dvc_yaml_stages(REPO))
    assert not stale, stale_message(stale)


def fake_project(root: Path) -> dict[str, str]:
    """A file, a folder (with a .dvcignore'd __pycache__) and a non-code file: the md5s DVC records for
    them, computed here by hand in DVC's format, so the test does not take DVC's word for its own hashes."""
    (root / "src" / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (root / "src" / "pkg" / "a.py").write_text("A = 1\n")
    (root / "src" / "pkg" / "b.py").write_text("B = 2\n")
    (root / "src" / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    (root / ".dvcignore").write_text("__pycache__/\n")
    (root / "data.txt").write_text("not code: never compared\n")

    def md5(path: str) -> str:
        return hashlib.md5((root / path).read_bytes()).hexdigest()

    listing = [{"md5": md5(f"src/pkg/{name}"), "relpath": name} for name in ("a.py", "b.py")]
    return {"bin/tool": md5("bin/tool"), "data.txt": "0" * 32,
            "src/pkg": hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"}


def write_lock(root: Path, stages: dict[str, dict[str, str]]) -> None:
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        name: {"cmd": "bin/tool", "deps": [{"path": p, "hash": "md5", "md5": m} for p, m in deps.items()]}
        for name, deps in stages.items()}}))


def test_the_comparison_passes_when_the_lock_agrees_and_names_each_difference(tmp_path):
    md5 = fake_project(tmp_path)
    stages = {"run@x": ["bin/tool", "src/pkg", "data.txt"], "other": ["bin/tool"]}
    write_lock(tmp_path, {"run@x": md5, "other": {"bin/tool": md5["bin/tool"]},
                          "removed": {"bin/tool": "0" * 32}})  # a stage dvc.yaml no longer defines: ignored
    assert stale_code_deps(tmp_path, stages) == {}

    (tmp_path / "bin" / "tool").write_text("#!/bin/sh\necho changed\n")
    (tmp_path / "src" / "pkg" / "b.py").write_text("B = 3\n")
    stale = stale_code_deps(tmp_path, stages)
    assert {stage: [why.split(" ")[0] for why in whys] for stage, whys in stale.items()} == {
        "run@x": ["bin/tool", "src/pkg"], "other": ["bin/tool"]}
    assert stale["run@x"][1].startswith(f"src/pkg (dvc.lock {md5['src/pkg']}, now ")
    message = stale_message(stale)
    assert "run@x: bin/tool" in message and "src/pkg" in message and "`dvc repro`" in message
    assert "commit -f" not in message

    (tmp_path / "bin" / "tool").unlink()
    assert stale_code_deps(tmp_path, stages)["other"] == [f"bin/tool (dvc.lock {md5['bin/tool']}, now gone)"]


def test_a_dep_added_or_dropped_since_the_last_run_or_no_run_is_stale(tmp_path):
    md5 = fake_project(tmp_path)
    write_lock(tmp_path, {"run": {"bin/tool": md5["bin/tool"]}, "other": md5})
    stale = stale_code_deps(tmp_path, {"run": ["bin/tool", "src/pkg"], "other": ["bin/tool"], "new": ["bin/tool"]})
    assert stale == {"run": ["src/pkg (a dep in dvc.yaml, not in dvc.lock)"],
                     "other": ["src/pkg (in dvc.lock, no longer a dep in dvc.yaml)"],
                     "new": ["never ran: not in dvc.lock"]}


def test_dvc_lock_holds_no_stage_that_dvc_yaml_no_longer_defines():
    """A lock entry of a removed stage (or a build no longer in quantize.enabled) records code no run can
    refresh: it is removed, never left stale."""
    defined = set(dvc_yaml_stages(REPO))
    recorded = set(yaml.safe_load((REPO / "dvc.lock").read_text())["stages"])
    assert recorded - defined == set(), "dvc.lock: stages dvc.yaml does not define; remove their entries"
