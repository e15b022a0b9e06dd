"""GPTQ builds with GPTQModel (the maintained successor of AutoGPTQ): layer-wise second-order weight
rounding on calibration activations; saved as a GPTQ checkpoint that transformers loads (through
optimum + GPTQModel kernels, which include a CPU one) and vLLM serves."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

from ftq.params import ParamsError
from ftq.quantize import check_options
from ftq.quantize.awq import check_divisible

NEEDS_CALIBRATION = True
OPTIONS = {
    "bits": 4,
    "group_size": 128,  # must divide the layers' input widths (SmolLM2-135M: 576 -> 64)
    "act_order": True,  # quantize columns in order of activation size (desc_act)
    "symmetric": True,
    "damp_percent": 0.05,
}


def validate(options: dict, where: str) -> dict:
    opts = check_options(options, OPTIONS, where)
    if opts["bits"] not in (2, 3, 4, 8):
        raise ParamsError(f"{where}: bits {opts['bits']}: GPTQ takes 2, 3, 4 or 8")
    if int(opts["group_size"]) <= 0 and int(opts["group_size"]) != -1:
        raise ParamsError(f"{where}: group_size must be > 0 (or -1: one group per row)")
    return opts


def build(source: Path, out: Path, options: dict, calibration) -> dict:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 2)))
    from gptqmodel import GPTQModel, QuantizeConfig

    if int(options["group_size"]) > 0:
        check_divisible(source, int(options["group_size"]))
    config = QuantizeConfig(bits=int(options["bits"]), group_size=int(options["group_size"]),
                            desc_act=bool(options["act_order"]), sym=bool(options["symmetric"]),
                            damp_percent=float(options["damp_percent"]))
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration.ids]
    # GPTQModel writes logs/gptq_log_*.log into the working directory: keep them out of the project
    with tempfile.TemporaryDirectory(prefix="ftq-gptq-") as scratch, contextlib.chdir(scratch):
        # GPTQModel places the model on the GPU when there is one (its default device), else the CPU
        model = GPTQModel.load(str(Path(source).resolve()), config)
        model.quantize(rows, batch_size=1, calibration_data_min_length=1)
        model.save(str(Path(out).resolve()))
    return {"artifact": "", "format": "gptq"}


def versions() -> dict:
    return {m: importlib.metadata.version(m) for m in ("gptqmodel", "optimum")}
