"""The `train` block of params.yaml, validated into one object (errors name the file and the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftq import schema
from ftq.params import ParamsError

DEEPSPEED_PRESETS = ("zero2", "zero2_offload", "zero3", "zero3_offload")


# one field per setting of params.yaml's `train` block, from ftq.schema (where each one's default,
# accepted values and help are): a setting added there is a field here
LoraSettings = schema.record("LoraSettings", "train.lora")


class TrainSettings(schema.record("TrainFields", "train", nested={"lora": LoraSettings})):
    """The validated `train` block (what each field means: ftq.schema, or `ftq params --explain train`),
    with the rules that tie settings together or depend on this machine."""

    @classmethod
    def defaults(cls, **changes) -> "TrainSettings":
        """The schema's defaults (with `changes`), validated: what an empty `train` block gives."""
        return cls.from_params({"train": changes})

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainSettings":
        values = schema.settings(params, "train")
        settings = cls(lora=LoraSettings(**values.pop("lora")), **values)
        settings.validate(f"{params.get('_path', 'params.yaml')}: train.")
        return settings

    def validate(self, where: str) -> None:
        """What ties settings together or depends on this machine (each value's own type, choices and
        range: ftq.schema)."""
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ParamsError(f"{where}{key}: {message}")

        if self.attn_implementation == "flash_attention_2":
            need(_installed("flash_attn"), "attn_implementation",
                 "flash_attention_2 needs the flash-attn package and a CUDA GPU (pip install flash-attn); use sdpa")
        if self.optim.endswith("8bit"):
            need(_installed("bitsandbytes"), "optim", f"{self.optim} needs bitsandbytes")
        need(self.max_steps > 0 or self.epochs > 0, "epochs", "set epochs > 0 or max_steps > 0")
        need(self.node_rank < self.nnodes, "node_rank", f"must be in [0, nnodes={self.nnodes})")
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
