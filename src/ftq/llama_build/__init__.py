"""ftq's build of llama.cpp: one CMake build of the sources vendored in the llama-cpp-python sdist, with
the patches in `patches/` applied (see the Makefile and docs/install.md#llamacpps-cpu-features).

`python -m ftq.llama_build smoke`, the last step of `make install`, checks that the build runs on this
machine: llama-cpp-python's library and `llama-server` each evaluate one batch of several hundred
tokens of the embedded model, and both have mapped the same library files. A native build uses every
instruction set the build machine's CPU reports; one the CPU or VM then refuses (AMX tile data a
kernel does not grant, AVX-512 a hypervisor hides) kills the process by a signal on the first batch,
and the smoke test names the signal, the features the build uses and the fix, instead of a stage
dying later with "exited with -4".

Each probe runs in a child process, so that a death by a signal is observed, not suffered."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ftq.processes import describe_exit, free_port, signal_of, stop_group, wait_http

BATCH_TOKENS = 400  # a prompt of this many tokens goes through llama.cpp as one batch
# the text of the batch: plain words, long enough for BATCH_TOKENS tokens with any tokenizer ftq ships
TEXT = " ".join(f"Order {n} of the spring catalogue ships to Montevideo on Tuesday with tracking." for n in range(25))

# run as `python -c`: load the GGUF, evaluate one batch, report what was mapped and the system info
LIBRARY_PROBE = r"""
import json, sys, time
import numpy as np
import llama_cpp
model, text, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = llama_cpp.llama_print_system_info().decode()
print(json.dumps({"system_info": info}), flush=True)
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=None, verbose=False)
tokens = llm.tokenize(text.encode())[:n]
start = time.perf_counter()
llm.eval(tokens)
seconds = time.perf_counter() - start
logits = np.asarray(llm.scores[len(tokens) - 1])
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libggml" in line or "libllama" in line})
print(json.dumps({"tokens": len(tokens), "seconds": seconds, "finite": bool(np.isfinite(logits).all()),
                  "libraries": maps}), flush=True)
"""


class SmokeFailed(RuntimeError):
    """The build does not run here: the message names the probe, how it died, and the fix."""


@dataclass
class Probe:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    libraries: list[str] = field(default_factory=list)


def compiled_features(system_info: str) -> list[str]:
    """The features a build uses, from llama.cpp's system info ('CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 |')."""
    return re.findall(r"\b([A-Z][A-Z0-9_]*) = 1\b", system_info)


def fix_for(returncode: int | None, features: list[str]) -> str:
    """What to rebuild with, given how a probe died and what the build uses. A pure decision, tested alone."""
    sig = signal_of(returncode)
    amx = [f for f in features if f.startswith("AMX")]
    if sig is not None and sig.name in ("SIGILL", "SIGSEGV", "SIGBUS") and amx:
        return (f"the build uses ggml's AMX kernels ({', '.join(amx)}), which this CPU or VM does not run: "
                "rebuild without them with `make install FTQ_LLAMA_AMX=0`, or check that "
                "src/ftq/llama_build/patches/ was applied (FTQ_LLAMA_PATCHES)")
    if sig is not None and sig.name == "SIGILL":
        return (f"the build uses instructions this CPU or VM refuses (it was built with {', '.join(features) or 'no listed features'} "
                "for the CPU it was built on): rebuild for this machine with `make install` after removing "
                "~/.cache/ftq/llama.cpp, or portably with `make install FTQ_LLAMA_CMAKE_ARGS='-DGGML_NATIVE=OFF'`")
    return "see its output above; `make install FTQ_LLAMA_AMX=0` or FTQ_LLAMA_CMAKE_ARGS='-DGGML_NATIVE=OFF' rebuild llama.cpp"


def _failure(probe: str, returncode: int | None, features: list[str], output: str) -> SmokeFailed:
    tail = "\n".join(output.strip().splitlines()[-15:])
    return SmokeFailed(f"llama.cpp smoke test: {probe} {describe_exit(returncode)} evaluating a batch of "
                       f"{BATCH_TOKENS} tokens.\nFix: {fix_for(returncode, features)}"
                       + (f"\nIts output:\n{tail}" if tail else ""))


def library_probe(model: Path, python: str = sys.executable, timeout: float = 300) -> tuple[Probe, list[str]]:
    """llama-cpp-python evaluates one batch in a child process; returns the probe and the build's features."""
    result = subprocess.run([python, "-c", LIBRARY_PROBE, str(model), TEXT, str(BATCH_TOKENS)],
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    features = compiled_features(next((r["system_info"] for r in reports if "system_info" in r), ""))
    done = next((r for r in reports if "tokens" in r), None)
    if result.returncode != 0 or done is None:
        raise _failure("llama-cpp-python", result.returncode, features, result.stderr + result.stdout)
    if not done["finite"] or done["tokens"] < BATCH_TOKENS:
        raise SmokeFailed(f"llama.cpp smoke test: llama-cpp-python evaluated {done['tokens']} tokens, "
                          f"logits finite: {done['finite']} (expected {BATCH_TOKENS} tokens, finite logits)")
    return Probe("llama-cpp-python", done["tokens"], done["seconds"], done["libraries"]), features


def server_probe(model: Path, server: Path, features: list[str], timeout: float = 300) -> Probe:
    """llama-server loads the GGUF, warms up and evaluates one prompt of BATCH_TOKENS tokens."""
    port = free_port()
    with tempfile.NamedTemporaryFile(prefix="ftq-smoke-llama-server-", suffix=".log") as log:
        process = subprocess.Popen([str(server), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                                    "--ctx-size", "1024", "--batch-size", "512", "--no-webui", "--parallel", "1"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_healthy(base, process, timeout, log.name, features)
            body = json.dumps({"prompt": TEXT, "n_predict": 1, "cache_prompt": False}).encode()
            start = time.perf_counter()
            try:
                request = urllib.request.Request(f"{base}/completion", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    answer = json.loads(response.read())
            except OSError as exc:
                if process.wait(timeout=10) is not None:
                    raise _failure("llama-server", process.returncode, features, Path(log.name).read_text(errors="replace")) from exc
                raise
            seconds = time.perf_counter() - start
            maps = sorted({line.split()[-1] for line in Path(f"/proc/{process.pid}/maps").read_text().splitlines()
                           if "libggml" in line or "libllama" in line})
        finally:
            stop_group(process)
    evaluated = int(answer.get("tokens_evaluated") or answer.get("timings", {}).get("prompt_n") or 0)
    if evaluated < BATCH_TOKENS:
        raise SmokeFailed(f"llama.cpp smoke test: llama-server evaluated {evaluated} prompt tokens, expected >= {BATCH_TOKENS}")
    return Probe("llama-server", evaluated, seconds, maps)


def _wait_healthy(base: str, process: subprocess.Popen, timeout: float, log: str, features: list[str]) -> None:
    try:
        wait_http(f"{base}/health", process, timeout, log)
    except RuntimeError as exc:
        if process.poll() is not None:
            raise _failure("llama-server", process.returncode, features, Path(log).read_text(errors="replace")) from exc
        raise SmokeFailed(f"llama.cpp smoke test: {exc}") from exc


def _llama_libraries(paths: list[str]) -> list[str]:
    return sorted({os.path.realpath(p) for p in paths if re.search(r"/lib(ggml[^/]*|llama)\.so", p)})


def same_build(library: Probe, server: Probe) -> None:
    """Both probes mapped the same library files (by real path): one build serves the runtime and the tools."""
    ours, theirs = _llama_libraries(library.libraries), _llama_libraries(server.libraries)
    if not ours or ours != theirs:
        raise SmokeFailed("llama.cpp smoke test: llama-cpp-python and llama-server load different llama.cpp "
                          f"libraries:\n  llama-cpp-python: {ours}\n  llama-server:     {theirs}\n"
                          "Fix: `make install` links both to one build (.venv/share/ftq/llama.cpp/lib)")


def smoke(model: Path | None = None, server: Path | None = None) -> list[Probe]:
    from ftq.engines.llama_server import binary
    from ftq.stages.base import embedded_gguf

    model = Path(model) if model else embedded_gguf()
    library, features = library_probe(model)
    served = server_probe(model, Path(server) if server else binary(), features)
    same_build(library, served)
    return [library, served]
