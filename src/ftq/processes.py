"""Processes: stopping ftq itself cleanly (SIGTERM as Ctrl-C), and child servers (mlflow server,
PostgreSQL's clients): start in their own process group, wait until they answer, stop the whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


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
    # a process started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT
    # ignored, and Python then leaves it ignored: DVC's and `ftq run`'s stop (a SIGINT) would be lost
    signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_code(stop: KeyboardInterrupt) -> int:
    """The shell's code for death by that signal (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


# what a death by each signal most likely means here, for messages that name it instead of "exited with -4"
SIGNAL_CAUSES = {
    "SIGILL": "an instruction this CPU or VM does not allow; see docs/install.md#llamacpps-cpu-features",
    "SIGSEGV": "an invalid memory access in native code",
    "SIGBUS": "a bad memory access, often a memory-mapped file that was truncated or a full /dev/shm",
    "SIGFPE": "an arithmetic fault in native code",
    "SIGABRT": "native code aborted (a failed assertion; its message is in the output above)",
    "SIGKILL": "killed, often by the kernel's out-of-memory killer (see dmesg)",
    "SIGTERM": "stopped from outside",
    "SIGINT": "interrupted",
}


def signal_of(returncode: int | None) -> signal.Signals | None:
    """The signal a process died by: subprocess's negative return code, or a shell's 128 + N."""
    if returncode is None or returncode == 0:
        return None
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 128 + 65 else None
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None


def describe_exit(returncode: int | None) -> str:
    """'died by SIGILL (an instruction this CPU or VM does not allow; ...)', or 'exited with 3'."""
    sig = signal_of(returncode)
    if sig is None:
        return f"exited with {returncode}"
    cause = SIGNAL_CAUSES.get(sig.name)
    return f"died by {sig.name}" + (f" ({cause})" if cause else "")


def supervise(label: str) -> int | None:
    """Run the rest of this command in a forked child and wait for it here, so that a death by a signal in
    native code (llama.cpp, torch) is named with its likely cause instead of DVC's bare "exited with -4".
    Returns None in the child (go on with the command) and the child's exit code in the parent, where a
    death by signal N becomes the shell's 128 + N. Stops sent to this process (SIGTERM, SIGHUP, and
    SIGINT from DVC or `ftq run`) are passed on to the child, which has its own process group so that a
    Ctrl-C at the terminal reaches it once, through here; the child dies with its parent, even a SIGKILLed one.
    FTQ_SUPERVISE=0 runs the command in this process."""
    if os.environ.get("FTQ_SUPERVISE") == "0":
        return None
    watcher = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        _die_with_parent(signal.SIGKILL)
        os.environ[WATCHER_ENV] = str(watcher)
        return None
    previous = {sig: signal.signal(sig, lambda signum, _frame: _forward(pid, signum))
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code
    import sys

    print(f"ftq {label}: {describe_exit(code)}", file=sys.stderr, flush=True)
    return 128 - code


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _die_with_parent(sig: int) -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() == 1:  # the parent was already gone before the prctl
        os.kill(os.getpid(), sig)


WATCHER_ENV = "FTQ_WATCHER_PID"


def owner_pid() -> int:
    """The pid that names this run's temp paths and RUNNING records: the watcher's where `supervise` runs
    the command in a child (the child dies with it, so once the watcher is gone, so is the work, and its
    leftovers can be swept the moment the watcher's death is seen), else this process's own."""
    watcher = os.environ.get(WATCHER_ENV, "")
    return int(watcher) if watcher.isdigit() and watcher == str(os.getppid()) else os.getpid()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead: only its exit status is left for a parent that may never read it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
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
            raise RuntimeError(f"{process.args[:4]} {describe_exit(process.returncode)}{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop_group(process)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s{log_tail(log_path)}")


def log_tail(log_path) -> str:
    if not log_path or not os.path.exists(log_path):
        return ""
    with open(log_path, errors="replace") as handle:
        return ":\n" + "".join(handle.readlines()[-20:])
