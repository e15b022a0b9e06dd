"""Processes: stopping ftq itself cleanly (SIGTERM as Ctrl-C), and child servers (mlflow server,
PostgreSQL's clients): start in their own process group, wait until they answer, stop the whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request


class Stopped(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived. A KeyboardInterrupt, so Ctrl-C and a stop take one path: every
    `finally` and `except BaseException` runs (temp outputs are removed, the MLflow run ends KILLED),
    and no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def stop_on_signals() -> None:
    """Python's default for SIGTERM is to die on the spot, running no cleanup: raise Stopped instead.
    (SIGKILL cannot be caught: what it leaves, the next run of the stage removes.)"""

    def stop(signum, _frame):
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def exit_code(stop: KeyboardInterrupt) -> int:
    """The shell's code for death by that signal (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    """`mlflow server` starts uvicorn and job workers of its own: a SIGTERM to the parent alone would
    leave them running, so the group goes, politely first."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_http(url: str, process: subprocess.Popen, timeout: float, log_path=None) -> None:
    """Until `url` answers 200; an exited process or the timeout is an error quoting its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop_group(process)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s{_tail(log_path)}")


def _tail(log_path) -> str:
    if not log_path or not os.path.exists(log_path):
        return ""
    with open(log_path, errors="replace") as handle:
        return ":\n" + "".join(handle.readlines()[-20:])
