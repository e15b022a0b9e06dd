"""Stage `machine`: what this machine computes in, recorded in data/machine.json so that it is an input of
every stage whose numbers depend on it (train, preference, evaluate_merged, evaluate_base, ladder).

`train.precision: auto` trains in bf16 where the CPU (AVX512-BF16, AMX) or GPU multiplies it natively and
in fp32 elsewhere, and `evaluate.lm_eval.dtype: auto` scores HF candidates the same way. The same params
then give different numbers on different machines; without this file DVC would take outputs made at bf16
on one machine for the outputs of an fp32 machine (and the run-cache would restore them there). The stage
runs on every `dvc repro` (always_changed, a fraction of a second) and its output changes only where the
machine's arithmetic does, so the stages that depend on it rerun exactly then. Only what changes the
arithmetic is recorded (not the CPU's name), so two machines that compute alike share results."""

from __future__ import annotations

from typing import Any

from ftq import layout
from ftq.io import atomic_write_json
from ftq.params import repo_root


def facts() -> dict[str, Any]:
    """The arithmetic this machine offers: a GPU (and whether it multiplies bf16 natively), else whether
    the CPU has bf16 matrix instructions."""
    import torch

    from ftq.hf import cpu_multiplies_bf16

    cuda = torch.cuda.is_available()
    return {"device": "cuda" if cuda else "cpu",
            "native_bf16": bool(torch.cuda.is_bf16_supported(including_emulation=False)) if cuda
            else cpu_multiplies_bf16()}


def run(params: dict[str, Any]) -> dict[str, Any]:
    recorded = facts()
    atomic_write_json(repo_root() / layout.MACHINE, recorded)
    return recorded
