"""Batch collation for training and evaluation.

- padded: right-pads a batch; labels padded with -100.
- packed: concatenates the batch into one row with position_ids restarting at 0 for each example and
  the first label of each example set to -100, so no token predicts across a boundary. transformers
  derives a block-diagonal causal mask from the restarting position_ids, so examples never attend to
  each other (call the model with use_cache=False outside Trainer, or the mask is not derived).
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


def make_collator(pad_token_id: int, packing: bool):
    if packing:
        return packed
    return lambda features: padded(features, pad_token_id)
