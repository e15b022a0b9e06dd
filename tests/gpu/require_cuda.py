"""`make test-gpu`'s first step: where a GPU answers `nvidia-smi -L`, this venv's torch must see it.
Otherwise every GPU test skips ("no CUDA GPU") and the run passes having tested nothing: a CPU build of
torch (or a driver torch cannot use) on a GPU host must fail loudly instead. Exit 0 where no GPU answers."""

from __future__ import annotations

import subprocess
import sys


def listed_gpus() -> list[str]:
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in done.stdout.splitlines() if line.startswith("GPU")] if done.returncode == 0 else []


def main() -> int:
    gpus = listed_gpus()
    if not gpus:
        print("test-gpu: no GPU answers `nvidia-smi -L`; the GPU tests will skip")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"error: test-gpu: nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}), but torch {torch.__version__} "
              f"(CUDA {torch.version.cuda or 'none: a CPU build'}) sees none, so every GPU test would skip. Install "
              "a CUDA build of torch in .venv (PyPI's Linux wheel is one) or fix the driver, then rerun.",
              file=sys.stderr)
        return 1
    print(f"test-gpu: torch sees {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
