"""A killed compile of a torch extension leaves torch's lock behind; ftq clears it only once the compile
is gone. Shown with a real compile (torch.utils.cpp_extension) that is killed part-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from ftq.training.deepspeed_ops import (clear_stale_locks, compiling_in, is_stale, working_directories)


def test_a_lock_is_stale_only_when_no_compile_runs_and_it_is_old():
    assert is_stale(age_s=3600, compiling=False)
    assert not is_stale(age_s=3600, compiling=True)
    assert not is_stale(age_s=1, compiling=False)  # torch has written the lock, ninja has not started


def test_a_process_working_below_the_folder_counts_as_compiling(tmp_path):
    assert compiling_in(tmp_path, {tmp_path / "build"})
    assert compiling_in(tmp_path, {tmp_path})
    assert not compiling_in(tmp_path / "op", {tmp_path})


COMPILE = textwrap.dedent("""
    from torch.utils.cpp_extension import load_inline
    load_inline("ftq_lock_probe", cpp_sources="int probe() { return 1; }", functions=["probe"])
""")


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _kill_working_in(folder: Path) -> None:
    for pid, cwd in working_directories().items():
        if compiling_in(folder, [cwd]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def test_the_lock_of_a_killed_compile_is_cleared_once_its_compilers_are_gone(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    compile_ = subprocess.Popen([sys.executable, "-c", COMPILE], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: list(tmp_path.glob("ftq_lock_probe/lock")), 60, "torch's lock")
        lock = next(tmp_path.glob("ftq_lock_probe/lock"))
        _wait(lambda: compiling_in(lock.parent, working_directories().values()), 60, "ninja to start")
        compile_.kill()  # the python process that holds the lock; ninja and the compiler run on
        compile_.wait()
        assert lock.exists()
        assert clear_stale_locks(tmp_path, stale_after_s=0) == [], "a running compile's lock is not stale"
    finally:
        _kill_working_in(tmp_path)  # ninja starts each compiler in a process group of its own
    _wait(lambda: not compiling_in(lock.parent, working_directories().values()), 30, "the compilers to exit")
    assert lock.exists(), "torch leaves the lock of a killed compile"

    waiter = threading.Thread(target=FileBaton(str(lock)).wait, daemon=True)
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive(), "a later load waits on the left lock"

    assert clear_stale_locks(tmp_path, stale_after_s=60) == [], "a lock younger than a minute is kept"
    assert clear_stale_locks(tmp_path, stale_after_s=0) == [lock]
    assert not lock.exists()
    waiter.join(5.0)
    assert not waiter.is_alive(), "the load goes on"


def test_locks_are_found_where_torch_puts_them(tmp_path):
    from ftq.training.deepspeed_ops import lock_files

    for folder in ("cpu_adam", "py311_cpu/cpu_adam"):  # under $TORCH_EXTENSIONS_DIR, under the default root
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "lock").touch()
    assert lock_files(tmp_path) == [tmp_path / "cpu_adam/lock", tmp_path / "py311_cpu/cpu_adam/lock"]


def test_a_finished_compile_leaves_nothing_to_clear(tmp_path):
    (tmp_path / "py311_cpu" / "cpu_adam").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    assert clear_stale_locks(tmp_path, stale_after_s=0) == []


def test_make_install_compiles_cpu_adam_through_the_clearing_step():
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert "-m ftq.training.deepspeed_ops" in makefile
