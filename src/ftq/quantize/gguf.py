"""GGUF builds with llama.cpp itself: its convert_hf_to_gguf.py (shipped in the llama-cpp-python sdist;
`make install` unpacks it into .venv/share/ftq/llama.cpp) writes an f16/bf16/f32 GGUF, then `llama-quantize`
(the vendored build's own tool) makes the requested type, with the importance matrix of stage `imatrix`
where the build asks for it (`imatrix: true`, or `auto`: every type of 4 bits or fewer).

Type names are the `gguf` package's enums (LlamaFileType for a file's type, GGMLQuantizationType for one
tensor's), lower-cased: the package llama.cpp's converter writes with, not a table of ftq's."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gguf import GGMLQuantizationType, LlamaFileType

from ftq.params import ParamsError
from ftq.quantize import check_options

NEEDS_CALIBRATION = False
USES_IMATRIX = True  # build() takes stage imatrix's matrix (where the options ask for it)
OPTIONS = {
    "type": "q4_k_m",
    "output_type": None,  # type of output.weight (the token embedding when tied); None: llama.cpp's choice
    "token_embedding_type": None,
    "pure": False,  # true: every tensor in `type`, no k-quant mixture
    "intermediate": "f16",  # what convert_hf_to_gguf writes before quantizing: f16 | bf16 | f32
    # quantize with stage imatrix's importance matrix: true | false | auto (on for types of <= 4 bits)
    "imatrix": "auto",
}
FILE_TYPES = {("f32" if t.name == "ALL_F32" else t.name.removeprefix("MOSTLY_").lower()): int(t)
              for t in LlamaFileType if t.name != "GUESSED"}
TENSOR_TYPES = {t.name.lower(): int(t) for t in GGMLQuantizationType}
UNQUANTIZED = ("f32", "f16", "bf16")
# llama-quantize refuses these without an importance matrix (tools/quantize/quantize.cpp)
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "q2_k_s")
IMATRIX_AUTO_BITS = 4
FILE_NAME = "model.gguf"


def nominal_bits(file_type: str) -> int | None:
    """The bits a type's name gives its weights (q4_k_m: 4, iq3_xxs: 3, q8_0: 8); None for f16/bf16/f32."""
    found = re.match(r"t?i?q(\d)", file_type)
    return int(found.group(1)) if found else None


def uses_imatrix(opts: dict) -> bool:
    """Whether a build quantizes with the importance matrix (`auto`: types of 4 bits or fewer)."""
    if opts["imatrix"] == "auto":
        bits = nominal_bits(opts["type"])
        return bits is not None and bits <= IMATRIX_AUTO_BITS
    return bool(opts["imatrix"])


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
    if opts["imatrix"] not in (True, False, "auto"):
        raise ParamsError(f"{where}: imatrix {opts['imatrix']!r}: expected true, false or auto")
    if opts["type"] in UNQUANTIZED and opts["imatrix"] is True:
        raise ParamsError(f"{where}: imatrix: true on an unquantized type ({opts['type']}) does nothing")
    if opts["type"] in NEEDS_IMATRIX and not uses_imatrix(opts):
        raise ParamsError(f"{where}: type {opts['type']} needs the importance matrix (llama-quantize refuses it "
                          "without one): leave imatrix auto or set it true")
    return opts


def tool(name: str) -> Path:
    """One of the vendored llama.cpp build's tools, installed beside this Python (`make install`)."""
    found = Path(sys.prefix) / "bin" / name
    if not found.exists():
        found = Path(shutil.which(name) or found)
    if not found.exists():
        raise FileNotFoundError(f"{found}: llama.cpp's {name} is missing; `make install` builds it from the "
                                "llama-cpp-python sdist")
    return found


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


def quantize_command(source: Path, target: Path, opts: dict, threads: int, imatrix: Path | None) -> list[str]:
    """llama-quantize's command line for one build."""
    command = [str(tool("llama-quantize"))]
    if imatrix is not None:  # by file name: quantize() runs in its folder (the GGUF records the path it is given)
        command += ["--imatrix", Path(imatrix).name]
    if opts["pure"]:
        command.append("--pure")
    if opts["output_type"] is not None:
        command += ["--output-tensor-type", opts["output_type"]]
    if opts["token_embedding_type"] is not None:
        command += ["--token-embedding-type", opts["token_embedding_type"]]
    return command + [str(source), str(target), opts["type"].upper(), str(threads)]


def quantize(source: Path, target: Path, opts: dict, threads: int, imatrix: Path | None = None) -> None:
    """llama-quantize, in the importance matrix's folder where there is one: the GGUF then records its file
    name (`quantize.imatrix.file`), not where the project lies, and two clones make the same bytes."""
    source, target = Path(source).resolve(), Path(target).resolve()
    # the folder that holds the matrix by its own name: not resolved, since a DVC cache of symlinks
    # (cache.type symlink) points it at a file named by its hash
    result = subprocess.run(quantize_command(source, target, opts, threads, imatrix), capture_output=True, text=True,
                            cwd=Path(imatrix).absolute().parent if imatrix is not None else None)
    if result.returncode != 0 or not target.exists():
        from ftq.processes import describe_exit

        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama-quantize {source} -> {opts['type']} failed ({describe_exit(result.returncode)}):\n{tail}")


def build(source: Path, out: Path, options: dict, calibration=None, imatrix: Path | None = None,
          converted: Path | None = None) -> dict:
    """The build in `out`; `imatrix` is stage imatrix's matrix, used where the options ask for it;
    `converted`, stage imatrix's f16 GGUF of the same source, spares a conversion where the build starts
    from f16 (the default intermediate)."""
    target = out / FILE_NAME
    matrix = imatrix if uses_imatrix(options) else None
    if uses_imatrix(options) and (imatrix is None or not Path(imatrix).exists()):
        raise FileNotFoundError(f"{imatrix}: build type {options['type']} uses the importance matrix and there is "
                                "none; run `dvc repro imatrix` first")
    needs_quantize = not (
        options["type"] == options["intermediate"] and options["output_type"] is None
        and options["token_embedding_type"] is None
    )
    shared = converted is not None and Path(converted).exists() and options["intermediate"] == "f16" and needs_quantize
    intermediate = Path(converted) if shared else (out / f"model-{options['intermediate']}.gguf" if needs_quantize else target)
    if not shared:
        convert(source, intermediate, options["intermediate"])
    if needs_quantize:
        try:
            quantize(intermediate, target, options, os.cpu_count() or 1, matrix)
        finally:
            if not shared:
                intermediate.unlink(missing_ok=True)
    return {"artifact": FILE_NAME, "tensor_types": tensor_type_counts(target), "imatrix": matrix is not None,
            "from_shared_f16": shared}


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
