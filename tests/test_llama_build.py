"""ftq's build of llama.cpp runs where it was built: the install's smoke test evaluates a batch of hundreds
of tokens through llama-cpp-python and through llama-server (the same library files), and stops, naming
the signal and the fix, on a build that dies."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ftq import llama_build
from ftq.llama_build import BATCH_TOKENS, SmokeFailed, compiled_features, fix_for
from ftq.processes import describe_exit, signal_of

SYSTEM_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
               "AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_a_death_by_signal_is_named_with_its_likely_cause():
    assert signal_of(-4) == signal.SIGILL and signal_of(132) == signal.SIGILL
    assert signal_of(0) is None and signal_of(2) is None
    assert describe_exit(-4).startswith("died by SIGILL (an instruction this CPU or VM does not allow")
    assert describe_exit(-9).startswith("died by SIGKILL (killed, often by the kernel's out-of-memory killer")
    assert describe_exit(3) == "exited with 3"


def test_the_fix_names_amx_when_an_amx_build_dies_and_the_portable_build_otherwise():
    features = compiled_features(SYSTEM_INFO)
    assert "AMX_INT8" in features and "AVX512" in features and "SSE3" in features
    assert "FTQ_LLAMA_AMX=0" in fix_for(-4, features) and "AMX_INT8" in fix_for(-11, features)
    without_amx = [f for f in features if not f.startswith("AMX")]
    assert "GGML_NATIVE=OFF" in fix_for(-4, without_amx) and "AMX" not in fix_for(-4, without_amx)


@pytest.mark.slow
def test_the_library_and_llama_server_evaluate_a_batch_of_hundreds_of_tokens_on_one_build():
    library, server = llama_build.smoke()
    assert library.tokens == BATCH_TOKENS and server.tokens >= BATCH_TOKENS
    shared = llama_build._llama_libraries(library.libraries)
    assert shared == llama_build._llama_libraries(server.libraries)
    assert any("libggml-cpu" in p for p in shared) and any(p.endswith(".so") or ".so." in p for p in shared)


def test_the_smoke_test_stops_on_a_llama_server_that_dies_by_sigill(tmp_path):
    dying = _script(tmp_path / "llama-server", "#!/bin/sh\nkill -ILL $$\n")
    result = subprocess.run([sys.executable, "-m", "ftq.llama_build", "smoke", "--server", str(dying)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "llama-server died by SIGILL (an instruction this CPU or VM does not allow" in result.stderr
    assert "Fix:" in result.stderr


def test_the_smoke_test_names_amx_when_the_library_of_an_amx_build_dies(tmp_path):
    """A Python whose llama.cpp dies by SIGILL on the batch after reporting an AMX build's system info."""
    dying = _script(tmp_path / "python", "#!/bin/sh\n"
                    f"echo '{{\"system_info\": \"{SYSTEM_INFO}\"}}'\n"
                    "kill -ILL $$\n")
    with pytest.raises(SmokeFailed) as failed:
        llama_build.library_probe(Path(os.devnull), python=str(dying))
    message = str(failed.value)
    assert "llama-cpp-python died by SIGILL" in message and "AMX_INT8" in message and "FTQ_LLAMA_AMX=0" in message
