"""Runtimes load a model artifact and answer chats or score token sequences, whatever its format:
transformers for HF folders (plain, AWQ/compressed-tensors, GPTQ), llama.cpp for GGUF files.
Every consumer (the quantize check, evaluate, serve, chat) goes through `open_model`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol


class Runtime(Protocol):
    kind: str  # "transformers" | "llama.cpp"
    path: Path

    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str: ...

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> Iterator[str]: ...

    def sequence_nll(self, token_ids: list[int], scored: list[bool] | None = None) -> tuple[float, int]:
        """Summed negative log-likelihood of tokens 1..n given their prefixes (only where `scored`),
        and how many tokens that was."""
        ...

    def close(self) -> None: ...


def default_threads() -> int:
    """llama.cpp's threads (runtime and engine): $FTQ_LLAMA_THREADS, else every CPU."""
    import os

    return max(1, int(os.environ.get("FTQ_LLAMA_THREADS") or os.cpu_count() or 1))


def artifact_format(path: str | Path) -> str:
    """gguf | hf | awq | gptq | compressed-tensors, from the files themselves."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ValueError(f"{path}: not a model (expected a .gguf file or a Hugging Face folder)")
    if list(path.glob("*.gguf")):
        return "gguf"
    config = path / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{path}: no model here (no config.json and no .gguf file)")
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return str(quant.get("quant_method") or "hf")


def gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected exactly one .gguf file, found {len(files)}")
    return files[0]


def gpu_layers() -> int:
    """Layers llama.cpp offloads: all of them (-1) where this build has a GPU backend (make install builds
    llama.cpp with CUDA where nvcc is present) and a GPU answers, none on a CPU build. FTQ_GPU_LAYERS
    overrides (e.g. a partial offload for a model larger than the GPU)."""
    import os

    if os.environ.get("FTQ_GPU_LAYERS"):
        return int(os.environ["FTQ_GPU_LAYERS"])
    try:
        import llama_cpp

        return -1 if llama_cpp.llama_supports_gpu_offload() else 0
    except (ImportError, AttributeError):
        return 0


def open_model(path: str | Path, threads: int | None = None, n_ctx: int = 2048, dtype: str = "auto",
               gpu: bool = True) -> Runtime:
    """`dtype` (auto: as stored) is the dtype a plain HF folder runs in; GGUF and the quantized HF
    formats run as they are stored. `gpu=False` keeps a GGUF's weights in RAM even on a GPU build."""
    path = Path(path)
    fmt = artifact_format(path)
    if fmt == "gguf":
        from ftq.runtimes.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime(gguf_file(path), threads=threads, n_ctx=n_ctx, gpu=gpu)
    from ftq.runtimes.transformers import TransformersRuntime

    return TransformersRuntime(path, threads=threads, dtype=dtype if fmt == "hf" else "auto")
