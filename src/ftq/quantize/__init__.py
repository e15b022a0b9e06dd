"""Quantization backends, one module per method behind one small interface (like PEFT's tuners):

    OPTIONS: dict               every option the method takes, with its default
    NEEDS_CALIBRATION: bool     whether build() gets calibration sequences from the project's data
    USES_IMATRIX: bool          (optional) whether build() takes `imatrix=`, stage imatrix's importance matrix
    validate(options, where) -> dict          complete, checked options (errors name params.yaml keys)
    build(source, out, options, calibration) -> dict   writes the build into `out`; returns tool versions
                                                        and anything else worth recording
    versions() -> dict          versions of the tools it uses
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ftq.params import ParamsError

METHODS = {"gguf": "ftq.quantize.gguf", "awq": "ftq.quantize.awq", "gptq": "ftq.quantize.gptq"}


def backend(method: str, where: str = "params.yaml") -> ModuleType:
    if method not in METHODS:
        raise ParamsError(f"{where}: method '{method}': expected one of {', '.join(METHODS)}")
    return importlib.import_module(METHODS[method])


def check_options(options: dict, defaults: dict, where: str) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ParamsError(f"{where}: unknown options {unknown}; this method takes {sorted(defaults)}")
    return {**defaults, **options}
