"""The GPU host checks, run on CPU with fake `nvidia-smi` and `cmake` on PATH (not marked gpu: they run
everywhere): make test-gpu refuses a GPU host whose torch cannot see the GPU, and a CUDA build of llama.cpp
passes over a system cmake older than 3.24."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REQUIRE_CUDA = ROOT / "tests" / "gpu" / "require_cuda.py"
PICK_CMAKE = ROOT / "src" / "ftq" / "llama_build" / "pick_cmake.sh"


def fake_tool(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def with_path(folder: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{folder}:/usr/bin:/bin"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU: the CPU-build case cannot arise")
def test_test_gpu_fails_on_a_gpu_host_whose_torch_is_a_cpu_build(tmp_path):
    fake_tool(tmp_path / "bin", "nvidia-smi", 'echo "GPU 0: Tesla T4 (UUID: GPU-00000000-0000-0000-0000-000000000000)"\n')
    done = subprocess.run([sys.executable, str(REQUIRE_CUDA)], env=with_path(tmp_path / "bin"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "nvidia-smi lists 1 GPU(s)" in done.stderr and "sees none" in done.stderr


def test_test_gpu_goes_on_where_no_gpu_answers(tmp_path):
    fake_tool(tmp_path / "bin", "nvidia-smi", 'echo "NVIDIA-SMI has failed: no driver" >&2; exit 9\n')
    done = subprocess.run([sys.executable, str(REQUIRE_CUDA)], env=with_path(tmp_path / "bin"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "will skip" in done.stdout


def test_make_test_gpu_runs_the_check_before_pytest():
    recipe = re.search(r"^test-gpu:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1).splitlines()
    assert "tests/gpu/require_cuda.py" in recipe[0] and "pytest" in recipe[1]


@pytest.mark.parametrize("version, chosen", [("3.22.1", "fallback"), ("3.24.0", "system"), ("3.31.6", "system"),
                                             (None, "fallback")])
def test_a_cuda_build_needs_cmake_3_24(tmp_path, version, chosen):
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("sed", "sort", "head"):  # what the script uses, and no real cmake
        (folder / tool).symlink_to(shutil.which(tool))
    if version:
        fake_tool(folder, "cmake", f'echo "cmake version {version}"; echo; echo "CMake suite maintained by Kitware"\n')
    done = subprocess.run(["/bin/sh", str(PICK_CMAKE), "3.24", "/cache/tools/bin/cmake"], env={"PATH": str(folder)},
                          capture_output=True, text=True, timeout=60)
    expected = str(folder / "cmake") if chosen == "system" else "/cache/tools/bin/cmake"
    assert done.returncode == 0 and done.stdout.strip() == expected
