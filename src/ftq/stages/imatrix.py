"""Stage `imatrix`: llama.cpp's importance matrix of the merged model, computed once per merged model by
`llama-imatrix` (the tool of the same vendored build as llama-server) on a seeded sample of the
fine-tune's own training data: the prepared train split, which holds the task's conversations and the
general replay data, chat-formatted exactly as training saw them. Every GGUF build that asks for it
(`imatrix: true`, or `auto`: types of 4 bits or fewer) quantizes with it (ftq.quantize.gguf).

llama.cpp weighs each weight's rounding error by how strongly that input channel is activated on this
text (the mean squared activation, per column): the weights the fine-tune's own prompts use most are kept
most exactly. Its own scoreboard (Llama-3-8B vs F16) shows the effect at equal file size (Q4_K_M KL
divergence 0.0313 -> 0.0282); bench/quantize.py measures it on this project's model.

Outputs:
  models/imatrix/   imatrix.gguf (llama.cpp's GGUF importance-matrix format), model-f16.gguf (the f16 GGUF of
                    merged it ran on, from which every GGUF build then quantizes: one conversion, not one
                    per build), sample.txt (the text it saw), imatrix.json (the sample, chunks, tokens,
                    seconds, the tool's command)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftq import schema
from ftq.io import atomic_dir, atomic_write_json, file_sha256
from ftq.params import repo_root
from ftq.provenance import stamp
from ftq.stages import MERGED_DIR, merged_model

log = logging.getLogger(__name__)

OUTPUT_DIR = Path("models/imatrix")
MATRIX = "imatrix.gguf"
SAMPLE = "sample.txt"
INFO = "imatrix.json"


@dataclass
class ImatrixSettings:
    samples: int
    max_length: int
    chunk_size: int
    seed: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ImatrixSettings":
        return cls(**schema.settings(params, "quantize")["imatrix"])


class ImatrixError(RuntimeError):
    """llama-imatrix could not compute the matrix (too little text, a failed run): says why."""


def sample_text(root: Path, settings: ImatrixSettings) -> tuple[str, dict]:
    """The training conversations llama-imatrix reads, as training rendered them (chat template, special
    tokens written out: llama-imatrix parses them back with --parse-special), one after another."""
    from transformers import AutoTokenizer

    from ftq.quantize.calibration import sample

    sequences = sample(root, "train", settings.samples, settings.max_length, settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(root / MERGED_DIR)
    text = "".join(tokenizer.decode(ids, skip_special_tokens=False) for ids in sequences.ids)
    return text, sequences.describe()


def command(model: Path, text: Path, out: Path, settings: ImatrixSettings, threads: int) -> list[str]:
    from ftq.quantize.gguf import tool
    from ftq.runtimes import gpu_layers

    return [str(tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out),
            "-c", str(settings.chunk_size), "-b", str(settings.chunk_size), "--parse-special", "--no-ppl",
            "-t", str(threads), "-ngl", str(gpu_layers())]


def chunks_of(log_text: str) -> int | None:
    """How many chunks llama-imatrix processed, from its log ('compute_imatrix: computing over 12 chunks')."""
    found = re.findall(r"computing over (\d+) chunks", log_text)
    return int(found[-1]) if found else None


def compute(model: Path, text: Path, out: Path, settings: ImatrixSettings, threads: int) -> dict:
    """llama-imatrix in the output's folder, given file names: the matrix records its text file's path
    (`imatrix.datasets`), and every build that uses it copies that into its GGUF, so a temporary folder's
    path would make each run's matrix and builds differ byte for byte."""
    argv = command(Path(model.name), Path(text.name), Path(out.name), settings, threads)
    started = time.time()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=out.parent)
    output = result.stdout + result.stderr
    if result.returncode != 0 or not out.exists():
        from ftq.processes import describe_exit

        tail = "\n".join(output.strip().splitlines()[-12:])
        hint = ""
        if "you need at least" in output:
            hint = (" (too little text for two chunks: raise quantize.imatrix.samples or lower "
                    "quantize.imatrix.chunk_size)")
        raise ImatrixError(f"llama-imatrix failed ({describe_exit(result.returncode)}){hint}:\n{tail}")
    return {"seconds": round(time.time() - started, 2), "chunks": chunks_of(output),
            "command": [Path(argv[0]).name, *argv[1:]]}


def run(params: dict[str, Any]) -> dict[str, Any]:
    from ftq.quantize import gguf
    from ftq.tracking import stage_run

    settings = ImatrixSettings.from_params(params)
    root = repo_root()
    merged = merged_model(root)
    text, sequences = sample_text(root, settings)
    with stage_run("imatrix", params, block_name="quantize", block_values={"imatrix": vars(settings)}) as tracked:
        with atomic_dir(root / OUTPUT_DIR) as tmp:
            (tmp / SAMPLE).write_text(text)
            model = tmp / "model-f16.gguf"
            started = time.time()
            gguf.convert(merged, model, "f16")
            convert_seconds = round(time.time() - started, 2)
            measured = compute(model, tmp / SAMPLE, tmp / MATRIX, settings, os.cpu_count() or 1)
            info = {"settings": vars(settings), "sample": sequences, "tokens": sequences["tokens"],
                    "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "convert_seconds": convert_seconds,
                    **measured, "sha256": file_sha256(tmp / MATRIX), "source": MERGED_DIR.as_posix(),
                    "tool_versions": gguf.versions()}
            atomic_write_json(tmp / INFO, stamp(info))  # imatrix.json: the stage's only record
        tracked.log_metrics({"tokens": info["tokens"], "chunks": info["chunks"] or 0, "seconds": info["seconds"]})
        tracked.log_artifact(root / OUTPUT_DIR / INFO)
    log.info("imatrix: %s chunks of %d tokens from %d training conversations (%d tokens), %.1f s",
             info["chunks"], settings.chunk_size, sequences["samples"], info["tokens"], info["seconds"])
    return info
