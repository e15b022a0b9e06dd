"""Load models/base for training: full weights, a LoRA adapter on top, or QLoRA (4-bit NF4 base with
double quantization through bitsandbytes, LoRA adapter in the compute dtype)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ftq.errors import QLoRAUnavailable
from ftq.hf import cpu_multiplies_bf16
from ftq.training.settings import TrainSettings

log = logging.getLogger(__name__)


def precision_flags(precision: str, base_dtype: str = "float32", cpu_bf16: bool | None = None) -> dict[str, bool]:
    """auto: bf16 on GPUs that compute in it natively, fp16 on older GPUs (whose bf16 is emulated: T4,
    V100); on CPU bf16 where the base is bf16 (rather than doubling it into float32) or the CPU has bf16
    matrix instructions, else fp32. bf16 is mixed precision (autocast): LoRA and full weights stay float32."""
    if precision == "auto":
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            native = cpu_multiplies_bf16() if cpu_bf16 is None else cpu_bf16
            precision = "bf16" if base_dtype == "bfloat16" or native else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision fp16 needs a GPU; use auto, bf16 or fp32 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def compute_dtype(flags: dict[str, bool]) -> torch.dtype:
    return torch.bfloat16 if flags["bf16"] else torch.float16 if flags["fp16"] else torch.float32


def check_bitsandbytes() -> None:
    """Fail before any work if 4-bit layers cannot run here (no CUDA and no working CPU backend)."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        raise QLoRAUnavailable(f"train.method qlora needs bitsandbytes, which failed to import: {exc}") from exc
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
        with torch.no_grad():
            layer(torch.randn(2, 64, device=device))
    except Exception as exc:
        raise QLoRAUnavailable(
            f"train.method qlora: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit layers on "
            f"{device} ({type(exc).__name__}: {exc}). Use a CUDA GPU, bitsandbytes >= 0.45 with its CPU backend, "
            "or train.method lora."
        ) from exc


def keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes' CPU path repacks 4-bit weights for AVX512-BF16 the first time it runs under no_grad
    (evaluation), after which gradients through those layers silently vanish. Keep the plain layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_kwargs(settings: TrainSettings, flags: dict[str, bool], device, root: Path) -> dict:
    """from_pretrained's arguments: weights straight onto this rank's device (never cuda:0 for every rank,
    never a CPU copy first), except under DeepSpeed, whose ZeRO-3 init places (and partitions) them itself."""
    from ftq.hf import load_kwargs as shared

    dtype = compute_dtype(flags)
    kwargs = {**shared(root), "attn_implementation": settings.attn_implementation,
              # full fine-tuning keeps fp32 master weights; mixed precision comes from the Trainer's autocast
              "dtype": torch.float32 if settings.method == "full" else dtype}
    if settings.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    elif device.type == "cuda" and not settings.deepspeed:
        kwargs["device_map"] = {"": device.index}
    return kwargs


def zero3_partitioned(model) -> bool | None:
    """Whether DeepSpeed's partitioned init built the weights (None: not under DeepSpeed at all). A
    partitioned parameter holds an empty placeholder; its shard lives in ds_tensor."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return None
    return all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters. Under ZeRO-3 a partitioned parameter holds an empty placeholder
    (numel 0) and its full size in ds_numel: counting numel would log a total of about nothing."""
    def size(p) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(size(p) for p in params if p.requires_grad), sum(size(p) for p in params)


def load_for_training(settings: TrainSettings, base_dir: Path, flags: dict[str, bool], device=None,
                      adapter: Path | None = None):
    """(model, tokenizer, facts about the load). Under ZeRO-3 the caller must have built the
    TrainingArguments (which carry the DeepSpeed config) before this, or every rank loads every weight.
    `adapter`: continue training that LoRA adapter (preference tuning after SFT) instead of a new one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftq.memory import bound_heap
    from ftq.training.launch import local_device

    if settings.gradient_checkpointing:  # memory over time, as the setting says: freed blocks go back at once
        bound_heap()                     # (about 40 % slower DPO steps on SmolLM2; scale.py's 1B row in bounds)
    device = device or local_device()
    root = Path(base_dir).parent.parent
    kwargs = load_kwargs(settings, flags, device, root)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=kwargs["trust_remote_code"])
    if settings.method == "qlora":
        check_bitsandbytes()
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if settings.method == "qlora" and device.type != "cuda":
        keep_cpu_4bit_trainable(model)
    facts = {"device": str(device), "dtype": str(kwargs["dtype"]).replace("torch.", ""),
             "attn_implementation": settings.attn_implementation, "zero3_partitioned": zero3_partitioned(model)}
    log.info("loaded %s for %s training: %s", base_dir, settings.method, facts)
    model.config.use_cache = False
    if settings.method == "full":
        return model, tokenizer, facts
    if adapter is not None:
        return continue_lora(model, settings, adapter), tokenizer, facts
    return add_lora(model, settings), tokenizer, facts


def continue_lora(model, settings: TrainSettings, adapter: Path):
    from peft import PeftModel, prepare_model_for_kbit_training

    if settings.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    with no_gptqmodel_probe():
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    log.info("continuing the LoRA adapter %s", adapter)
    return model


def add_lora(model, settings: TrainSettings):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=settings.lora.rank,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=settings.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with no_gptqmodel_probe():
        model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d trainable of %d parameters (%.2f%%)", settings.lora.rank,
             settings.lora.target_modules, trainable, total, 100 * trainable / total)
    return model


@contextlib.contextmanager
def no_gptqmodel_probe():
    """peft's GPTQ and AWQ LoRA dispatchers import GPTQModel (where installed) to test every layer's type
    (seconds on 2 cores, in train and again in merge). The base here never holds GPTQModel layers (HF weights in bf16/fp32, or bitsandbytes 4-bit), and the
    import costs resident memory in every training process and rewrites its environment
    (PYTORCH_ALLOC_CONF, which would change the CUDA allocator under training, and CUDA_DEVICE_ORDER)."""
    from peft.tuners.lora import awq, gptq

    saved = awq.is_gptqmodel_available, gptq.is_gptqmodel_available
    awq.is_gptqmodel_available = gptq.is_gptqmodel_available = lambda: False
    try:
        yield
    finally:
        awq.is_gptqmodel_available, gptq.is_gptqmodel_available = saved
