"""Settings every Hugging Face load in the project shares. `base.trust_remote_code` is decided once, at
the base stage (base.json records it), and reaches every later load of that model or a model made from
it: the adapter, the merged folder, the runtimes, the quantizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def trust_remote_code(root: Path | None = None) -> bool:
    from ftq.params import repo_root

    try:
        info = (root or repo_root()) / "models" / "base" / "base.json"
        return bool(json.loads(info.read_text()).get("trust_remote_code", False))
    except (OSError, ValueError):
        return False  # no base stage here (a deployed registry package): no remote code


def stored_dtype(folder: Path) -> str:
    """The dtype a model folder's weights are stored in (config.json), float32 when it does not say."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def load_kwargs(root: Path | None = None) -> dict[str, Any]:
    return {"trust_remote_code": trust_remote_code(root)}


def cpu_multiplies_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16): where it has them a bf16
    GEMM outruns fp32 (training's bf16 and fp32 rows in reports/bench/train.json), where it has not (AVX2
    only) bf16 is emulated and far slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell, so no bf16
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 natively: a GPU with native bf16 (not T4/V100's emulation),
    else a CPU with bf16 matrix instructions."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_multiplies_bf16()


def compute_dtype(setting: str, stored: str) -> str:
    """The dtype a plain HF model runs in for `setting` (auto | float32 | bfloat16 | float16): auto keeps
    what is stored, except that float32 runs in bfloat16 where the hardware multiplies bf16 natively (half
    the memory traffic, and faster scoring than float32; reports/bench/benchmarks.json measures both)."""
    if setting != "auto":
        return setting
    return "bfloat16" if stored == "float32" and native_bf16() else stored
