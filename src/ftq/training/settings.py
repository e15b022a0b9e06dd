"""The `train` block of params.yaml, validated into one object (errors name the file and the key)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ftq.params import ParamsError, block

METHODS = ("full", "lora", "qlora")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEEPSPEED_PRESETS = ("zero2", "zero2_offload", "zero3", "zero3_offload")
# the Trainer's names; the 8-bit ones (bitsandbytes) keep optimizer states in 8 bits, paged ones page them
# to CPU RAM under GPU memory pressure
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names


@dataclass
class TrainSettings:
    method: str = "lora"
    output_dir: str = "models/adapter"
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: str = "adamw_torch"
    attn_implementation: str = "sdpa"  # flash_attention_2 (where flash-attn is installed) packs without masks
    learning_rate: float = 5e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.1  # an int is a step count, a float < 1 a share of all steps
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = 8
    gradient_accumulation: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 42
    precision: str = "auto"
    group_by_length: bool = True
    packing: bool = False  # packed rows (examples isolated by position_ids) instead of padded batches
    logging_steps: int = 1
    eval_steps: int = 10  # 0: evaluate once at the end
    save_steps: int = 10
    save_total_limit: int = 2
    keep_checkpoints: bool = False
    checkpoint_dir: str = "models/checkpoints/train"
    torch_threads: int = 0  # 0: torch's default
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    deepspeed: str | None = None  # zero2 | zero2_offload | zero3 | zero3_offload | path to a JSON config

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainSettings":
        cfg = dict(block(params, "train"))
        where = f"{params.get('_path', 'params.yaml')}: train."
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ParamsError(f"{where}{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(known))})")
        lora_cfg = cfg.pop("lora", None) or {}
        lora_known = {f.name for f in fields(LoraSettings)}
        if set(lora_cfg) - lora_known:
            raise ParamsError(f"{where}lora.{sorted(set(lora_cfg) - lora_known)[0]}: unknown key")
        settings = cls(lora=LoraSettings(**lora_cfg), **cfg)
        settings.validate(where)
        return settings

    def validate(self, where: str) -> None:
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ParamsError(f"{where}{key}: {message}")

        need(isinstance(self.packing, bool), "packing", f"expected true or false, got {self.packing!r}")
        need(self.method in METHODS, "method", f"expected one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"expected one of {', '.join(SCHEDULERS)}")
        need(self.precision in PRECISIONS, "precision", f"expected one of {', '.join(PRECISIONS)}")
        need(self.optim in OPTIMIZERS, "optim", f"expected one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        need(self.attn_implementation in ATTENTION, "attn_implementation",
             f"expected one of {', '.join(ATTENTION)}, got {self.attn_implementation!r}")
        if self.attn_implementation == "flash_attention_2":
            need(_installed("flash_attn"), "attn_implementation",
                 "flash_attention_2 needs the flash-attn package and a CUDA GPU (pip install flash-attn); use sdpa")
        if self.optim.endswith("8bit"):
            need(_installed("bitsandbytes"), "optim", f"{self.optim} needs bitsandbytes")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.per_device_batch_size >= 1, "per_device_batch_size", "must be >= 1")
        need(self.gradient_accumulation >= 1, "gradient_accumulation", "must be >= 1")
        need(self.max_steps > 0 or self.epochs > 0, "epochs", "set epochs > 0 or max_steps > 0")
        need(self.warmup >= 0, "warmup", "must be >= 0 (steps, or a share < 1)")
        need(self.save_steps >= 1 and self.save_total_limit >= 1, "save_steps", "save_steps and save_total_limit must be >= 1")
        need(self.nproc_per_node >= 1 and self.nnodes >= 1, "nproc_per_node", "nproc_per_node and nnodes must be >= 1")
        need(0 <= self.node_rank < self.nnodes, "node_rank", f"must be in [0, nnodes={self.nnodes})")
        if self.method in ("lora", "qlora"):
            need(self.lora.rank >= 1 and self.lora.alpha > 0, "lora.rank", "rank must be >= 1 and alpha > 0")
            need(0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
            targets = self.lora.target_modules
            need(targets == "all-linear" or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)),
                 "lora.target_modules", "expected 'all-linear' or a list of module names")
        name = Path(self.output_dir).name
        if self.method == "full":
            need(name != "adapter", "output_dir", "method full writes a whole model: set train.output_dir: models/full")
        else:
            need(name != "full", "output_dir", f"method {self.method} writes an adapter: set train.output_dir: models/adapter")
        if self.deepspeed:
            need(self.deepspeed in DEEPSPEED_PRESETS or str(self.deepspeed).endswith(".json"), "deepspeed",
                 f"expected one of {', '.join(DEEPSPEED_PRESETS)} or a path to a .json config")
            need(self.method != "qlora", "deepspeed", "QLoRA with DeepSpeed is not supported; use DDP (nproc_per_node)")

    def deepspeed_config(self) -> str | None:
        if not self.deepspeed:
            return None
        if self.deepspeed in DEEPSPEED_PRESETS:
            return str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"{self.deepspeed}.json")
        return str(Path(self.deepspeed).resolve())


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
