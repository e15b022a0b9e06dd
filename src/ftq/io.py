"""Atomic outputs: everything is written to a temp path beside the target and renamed into place,
so a failed or stopped stage never leaves a half-written output behind. A temp path is named
`<target>.tmp-<pid>-<random>`: a failure or a stop (Ctrl-C, SIGTERM) removes it at once; what a
SIGKILL leaves, the next write of the same target removes (its process is gone)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _default_mode(path: Path, is_dir: bool) -> None:
    """mkdtemp/mkstemp create private (0700/0600) paths; outputs get the usual umask-based modes."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _temp_prefix(target: Path) -> str:
    from ftq.processes import owner_pid

    return f"{target.name}.tmp-{owner_pid()}-"


def remove_leftovers(target: Path) -> list[Path]:
    """Temp paths of `target` whose process has died (SIGKILL, power loss): removed."""
    from ftq.processes import pid_alive

    removed = []
    for path in target.parent.glob(f"{glob.escape(target.name)}.tmp-*"):
        pid = path.name[len(target.name) + len(".tmp-"):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove(path)
            removed.append(path)
    if removed:
        log.warning("removed %d leftover(s) of a killed run: %s", len(removed), ", ".join(str(p) for p in removed))
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    old = target.with_name(f"{_temp_prefix(target)}old")
    try:  # from mkdtemp on: a stop can land on any line, even before `tmp` is bound
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
        _default_mode(tmp, is_dir=True)
        yield tmp
        for path in tmp.rglob("*"):
            _default_mode(path, path.is_dir())
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)  # stopped between the two renames: the previous output stays
        _remove_own_temp_paths(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_own_temp_paths(target: Path) -> None:
    for path in target.parent.glob(f"{glob.escape(_temp_prefix(target))}*"):
        _remove(path)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        _default_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        _remove_own_temp_paths(path)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG through a temp file, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_md5(folder: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """One md5 over every file's relative path and bytes, in sorted order."""
    folder = Path(folder)
    digest = hashlib.md5()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        digest.update(rel.encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def dir_size(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """`rows` as CSV with `columns` (a missing value empty), written atomically."""
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
