"""Peak memory, reported for the device the work ran on: the process's resident set (CPU RAM) and,
separately, CUDA's peak allocation. A stage that ran on a GPU reports both; `peak_memory_bytes` is the
device's figure (CUDA where the model ran there, RAM otherwise), so the two are never confused."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """Largest resident set of this process or of a finished child (converters run as children)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, children)) * 1024  # Linux reports KiB


def peak_cuda_bytes() -> int:
    """CUDA's peak allocation in this process (0 when CUDA was never used: no context is created)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())))


def reset_cuda_peak() -> None:
    """Start CUDA's peak over (where CUDA is in use): what follows is measured on its own, not the peak of
    whatever ran earlier in the process (training before a merge in one test process, say)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory(on_gpu: bool | None = None) -> dict[str, int]:
    """{peak_memory_bytes (the device the work ran on), peak_rss_bytes, peak_cuda_bytes}."""
    rss, cuda = peak_rss_bytes(), peak_cuda_bytes()
    if on_gpu is None:
        on_gpu = cuda > 0
    return {"peak_memory_bytes": cuda if on_gpu else rss, "peak_rss_bytes": rss, "peak_cuda_bytes": cuda}


def release() -> None:
    """Hand freed memory back to the system. glibc serves tensors up to its largest mmap threshold (most
    weight matrices) from its heap once a large free has raised its mmap threshold, and keeps what is freed there: without a
    trim, a model deleted before the next one loads still counts, and the stage peaks at two models."""
    import gc

    gc.collect()
    _glibc("malloc_trim", 0)


M_MMAP_THRESHOLD = -3  # mallopt's parameter (glibc's malloc.h)


def bound_heap(threshold: int = 256 * 1024) -> None:
    """Serve allocations of `threshold` bytes or more from mmap, handed back to the system when freed.
    glibc's own threshold moves up to the largest block freed (up to DEFAULT_MMAP_THRESHOLD_MAX), after
    which a training step's activation-sized tensors come from its heap, and the holes they leave stay in
    the process: on a 1B model's DPO step they made the stage's peak (reports/bench/scale.json). Setting it also stops
    the threshold from moving. A no-op off glibc."""
    _glibc("mallopt", M_MMAP_THRESHOLD, threshold)


def _glibc(function: str, *args: int) -> None:
    import ctypes

    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
