"""Batch collation for training and evaluation.

- padded: right-pads a batch; labels padded with -100.
- packed: concatenates the batch into one row with position_ids restarting at 0 for each example and
  the first label of each example set to -100, so no token predicts across a boundary. transformers
  derives a block-diagonal causal mask from the restarting position_ids, so examples never attend to
  each other (call the model with use_cache=False outside Trainer, or the mask is not derived).
- at_label_positions (either layout): the model computes logits only where the next token is a label.

The logits are a training step's largest tensor on a small model with a large vocabulary (SmolLM2:
49,152 columns, float32, upcast again for the loss) and the lm_head a large share of its matmul work, yet
chat data puts labels on the answers alone: prompts and padding need neither.
"""

from __future__ import annotations

from typing import Any

import torch

from ftq.data.tokenize import IGNORE_INDEX


def padded(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for feature in features:
        ids = list(feature["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(feature["labels"][1:])
        position_ids += list(range(len(ids)))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
    }


def at_label_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add `logits_to_keep` (the sequence positions, over the whole batch, whose next token is a label
    in some row) and `shift_labels` (the next-token labels at exactly those positions). transformers'
    causal LMs then apply the lm_head there alone, and their loss (ForCausalLMLoss) scores the same
    label tokens with the same normalizer: the loss and gradients of the full logits, up to summation
    order. `labels` stays, so the Trainer still counts the batch's label tokens."""
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:  # no label at all: left as it was (the loss is then undefined either way)
        return batch
    return {**batch, "logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}


def make_collator(pad_token_id: int, packing: bool, label_positions: bool = False):
    collate = packed if packing else (lambda features: padded(features, pad_token_id))
    if label_positions:
        return lambda features: at_label_positions(collate(features))
    return collate


def takes_label_positions(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` as positions (every causal LM of transformers
    5 does; remote code might not)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters
