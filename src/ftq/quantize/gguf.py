"""GGUF builds with llama.cpp itself: its convert_hf_to_gguf.py (shipped in the llama-cpp-python sdist;
`make install` unpacks it into .venv/share/ftq/llama.cpp) writes an f16/bf16/f32 GGUF, then
llama_model_quantize (the library behind llama-quantize) makes the requested type."""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ftq.params import ParamsError
from ftq.quantize import check_options

NEEDS_CALIBRATION = False
OPTIONS = {
    "type": "q4_k_m",
    "output_type": None,  # type of output.weight (the token embedding when tied); None: llama.cpp's choice
    "token_embedding_type": None,
    "pure": False,  # true: every tensor in `type`, no k-quant mixture
    "intermediate": "f16",  # what convert_hf_to_gguf writes before quantizing: f16 | bf16 | f32
}
# file types llama.cpp can make without an importance matrix
FILE_TYPES = {
    "f32": 0, "f16": 1, "bf16": 32, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
    "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
    "q6_k": 18, "q2_k_s": 21, "iq4_nl": 25, "iq4_xs": 30,
}
TENSOR_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11,
    "q4_k": 12, "q5_k": 13, "q6_k": 14, "iq4_nl": 20, "iq4_xs": 23, "bf16": 30,
}
UNQUANTIZED = ("f32", "f16", "bf16")
FILE_NAME = "model.gguf"


def validate(options: dict, where: str) -> dict:
    opts = check_options(options, OPTIONS, where)
    opts["type"] = str(opts["type"]).lower()
    if opts["type"] not in FILE_TYPES:
        raise ParamsError(f"{where}: type '{opts['type']}': expected one of {', '.join(FILE_TYPES)}")
    for key in ("output_type", "token_embedding_type"):
        if opts[key] is not None:
            opts[key] = str(opts[key]).lower()
            if opts[key] not in TENSOR_TYPES:
                raise ParamsError(f"{where}: {key} '{opts[key]}': expected one of {', '.join(TENSOR_TYPES)}")
    if opts["intermediate"] not in UNQUANTIZED:
        raise ParamsError(f"{where}: intermediate '{opts['intermediate']}': expected f16, bf16 or f32")
    return opts


def convert_script() -> Path:
    folder = Path(os.environ.get("FTQ_LLAMA_CPP_TOOLS") or Path(sys.prefix) / "share" / "ftq" / "llama.cpp")
    script = folder / "convert_hf_to_gguf.py"
    if not script.exists():
        raise FileNotFoundError(
            f"{script}: llama.cpp's converter is missing; `make install` unpacks it from the llama-cpp-python "
            "sdist (or set FTQ_LLAMA_CPP_TOOLS to a llama.cpp checkout)"
        )
    return script


def byte_level_tokenizer(tokenizer: dict) -> dict | None:
    """transformers rebuilds a GGUF's GPT-2-style BPE tokenizer (SmolLM2's) with byte_fallback and a
    SentencePiece-style decoder chain ending in ByteLevel. It encodes and decodes the same, but llama.cpp's
    converter then takes it for a Llama SentencePiece-BPE vocabulary and writes a GGUF that crashes
    llama.cpp. Returns the plain byte-level form (same vocabulary, merges and pre-tokenizer), or None."""
    model = tokenizer.get("model") or {}
    pre = json.dumps(tokenizer.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or not model.get("byte_fallback") or '"ByteLevel"' not in pre:
        return None
    fixed = dict(tokenizer)
    fixed["model"] = {**model, "byte_fallback": False}
    fixed["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return fixed


def conversion_source(source: Path, scratch: Path) -> Path:
    """`source`, or a folder of links to it with the tokenizer in a form llama.cpp's converter reads right."""
    path = source / "tokenizer.json"
    fixed = byte_level_tokenizer(json.loads(path.read_text())) if path.exists() else None
    if fixed is None:
        return source
    scratch.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "tokenizer.json":
            (scratch / item.name).symlink_to(item.resolve())
    (scratch / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False))
    return scratch


def convert(source: Path, target: Path, outtype: str) -> None:
    scratch = target.with_name(target.name + ".src")
    try:
        _convert(conversion_source(source, scratch), target, outtype)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _convert(source: Path, target: Path, outtype: str) -> None:
    command = [sys.executable, str(convert_script()), str(source), "--outfile", str(target), "--outtype", outtype]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        from ftq.processes import describe_exit

        raise RuntimeError(f"convert_hf_to_gguf.py failed on {source} ({describe_exit(result.returncode)}):\n{tail}")


def quantize(source: Path, target: Path, opts: dict, threads: int) -> None:
    import llama_cpp

    qparams = llama_cpp.llama_model_quantize_default_params()
    qparams.nthread = threads
    qparams.ftype = FILE_TYPES[opts["type"]]
    qparams.pure = bool(opts["pure"])
    if opts["output_type"] is not None:
        qparams.output_tensor_type = TENSOR_TYPES[opts["output_type"]]
    if opts["token_embedding_type"] is not None:
        qparams.token_embedding_type = TENSOR_TYPES[opts["token_embedding_type"]]
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(qparams))
    if code != 0 or not target.exists():
        raise RuntimeError(f"llama_model_quantize {source} -> {opts['type']} failed (code {code})")


def build(source: Path, out: Path, options: dict, calibration=None) -> dict:
    target = out / FILE_NAME
    needs_quantize = not (
        options["type"] == options["intermediate"] and options["output_type"] is None
        and options["token_embedding_type"] is None
    )
    intermediate = out / f"model-{options['intermediate']}.gguf" if needs_quantize else target
    convert(source, intermediate, options["intermediate"])
    if needs_quantize:
        try:
            quantize(intermediate, target, options, os.cpu_count() or 1)
        finally:
            intermediate.unlink(missing_ok=True)
    return {"artifact": FILE_NAME, "tensor_types": tensor_type_counts(target)}


def tensor_type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds: shows llama.cpp's fallbacks (e.g. rows that k-quants
    cannot split) and the output.weight choice."""
    from gguf import GGUFReader
    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    return counts


def versions() -> dict:
    return {"llama-cpp-python": importlib.metadata.version("llama-cpp-python")}
