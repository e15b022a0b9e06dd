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
