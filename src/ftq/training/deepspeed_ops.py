"""DeepSpeed's CPU Adam (the *_offload presets) is a C++ extension that torch compiles on first use into its
extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/<python>_<cuda>/<op>/). torch
guards each compile with a `lock` file that it removes when the compile ends. A compile that is killed (a
stopped `make install`, a killed test or training run) leaves the file behind, and every later load of the
op then waits for it to go away, forever and without a word. `make install` and the DeepSpeed launch clear
such a lock first: one that no process is compiling under (ninja and the compilers run in the op's folder)
and that is over a minute old.

`python -m ftq.training.deepspeed_ops` compiles CPU Adam (make install's step)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# torch writes the lock, then build.ninja, then starts ninja in the folder: a lock this old with no process
# in its folder is one whose compile is gone
STALE_AFTER_S = 60.0


def extensions_root() -> Path:
    """torch's extension cache, as torch.utils.cpp_extension picks it: op folders sit right under
    $TORCH_EXTENSIONS_DIR, or under the default root's <python>_<cuda> folder."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def lock_files(root: Path) -> list[Path]:
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def working_directories() -> dict[int, Path]:
    """Where every process this user can see is working (its current directory), by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = Path(os.readlink(entry / "cwd"))
            except OSError:  # gone, or another user's
                continue
    return found


def is_stale(age_s: float, compiling: bool, stale_after_s: float = STALE_AFTER_S) -> bool:
    return not compiling and age_s >= stale_after_s


def compiling_in(folder: Path, cwds: Iterable[Path]) -> bool:
    folder = folder.resolve()
    return any(cwd == folder or folder in cwd.parents for cwd in cwds)


def clear_stale_locks(root: Path | None = None, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the lock of every op folder under the cache whose compile is gone; returns the removed locks."""
    root = root or extensions_root()
    locks = lock_files(root)
    if not locks:
        return []
    cwds = set(working_directories().values())
    removed = []
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # its compile just ended
            continue
        if is_stale(age, compiling_in(lock.parent, cwds), stale_after_s):
            lock.unlink(missing_ok=True)
            log.warning("removed %s: left by a compile that was stopped %.0f s ago (no process is compiling "
                        "there); torch would wait for it forever", lock, age)
            removed.append(lock)
    return removed


def compile_cpu_adam() -> None:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    clear_stale_locks()
    CPUAdamBuilder().load(verbose=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    compile_cpu_adam()
