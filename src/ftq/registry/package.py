"""A quantized build as an MLflow model, logged into MLflow's artifact store.

The logged model is one folder:

    MLmodel              pyfunc flavor: loader_module ftq.registry.pyfunc, data build/
    python_env.yaml      MLflow's environment files (ftq itself comes from the project's install)
    requirements.txt
    build/               the build's files exactly as `quantize` wrote them (model.gguf or an HF
                         folder, and manifest.json)

It is uploaded (ftq.registry.upload) as an MLflow 3 LoggedModel whose source run is the build's
`quantize@<name>` run. A registry version created from `models:/<model_id>` points into the artifact
store, so rebuilding, moving or deleting `models/` never changes what an old version serves.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

from ftq.registry import BUILD_DIR, build_digest, differences, digest, file_hashes

LOADER_MODULE = "ftq.registry.pyfunc"
# what the runtime of each format needs beside MLflow (requirements.txt of the logged model)
RUNTIME_PACKAGES = {"gguf": ["llama-cpp-python"], "default": ["torch", "transformers", "safetensors", "accelerate"]}


class ChangedBuildError(RuntimeError):
    """The build folder no longer holds the bytes its manifest recorded."""


@dataclass(frozen=True)
class LoggedBuild:
    model_id: str
    source: str             # models:/<model_id>: the registry version's source
    files: dict[str, str]   # every file of the logged model -> sha256

    @property
    def sha256(self) -> str:
        return digest(self.files)


def stage(build_dir: Path, target: Path, manifest: dict, model_id: str | None) -> dict[str, str]:
    """Lay the MLflow model out in `target` (empty) and return every file's sha256. Build files are
    hard-linked, not copied: the folder only feeds the upload, which makes the one real copy."""
    recorded = {path: f["sha256"] for path, f in manifest["files"].items()}
    for path in sorted(p for p in build_dir.rglob("*") if p.is_file()):
        dest = target / BUILD_DIR / path.relative_to(build_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:  # another filesystem
            shutil.copy2(path, dest)
    write_mlmodel(target, manifest, model_id)
    files = file_hashes(target)
    built = {path[len(BUILD_DIR) + 1:]: sha for path, sha in files.items()
             if path.startswith(f"{BUILD_DIR}/") and path != f"{BUILD_DIR}/manifest.json"}
    problems = differences(built, recorded, "manifest.json")
    if problems:
        raise ChangedBuildError(f"{build_dir}: the build changed since it was made ({'; '.join(problems)}); "
                                "rebuild it with `dvc repro`")
    return files


def write_mlmodel(target: Path, manifest: dict, model_id: str | None) -> None:
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.utils.environment import _PythonEnv

    fmt = manifest.get("format", manifest["method"])
    model = Model(model_id=model_id, metadata={"ftq": {
        "build": manifest.get("name"), "method": manifest["method"], "format": fmt,
        "artifact": manifest.get("artifact", ""), "artifact_sha256": build_digest(manifest),
        "options": manifest.get("options", {}),
    }})
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER_MODULE, data=BUILD_DIR, python_env="python_env.yaml")
    model.save(str(target / "MLmodel"))
    python = ".".join(map(str, sys.version_info[:3]))
    _PythonEnv(python=python, build_dependencies=["pip"], dependencies=["-r requirements.txt"]).to_yaml(
        str(target / "python_env.yaml"))
    lines = ["# ftq itself is installed from its repository (`make install`): serve with --env-manager local"]
    for package in ["mlflow", *RUNTIME_PACKAGES.get(fmt, RUNTIME_PACKAGES["default"])]:
        try:
            lines.append(f"{package}=={importlib_metadata.version(package)}")
        except importlib_metadata.PackageNotFoundError:
            lines.append(package)
    (target / "requirements.txt").write_text("\n".join(lines) + "\n")
