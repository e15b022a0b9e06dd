"""Preference objectives on TRL's trainers, fed ftq's own preference tokens.

ftq tokenizes preference records once (ftq.data.tokenize.tokenize_preference: the prompt's ids shared
exactly by both answers, each answer cut to the room left and named when it does not fit). TRL's
trainers would tokenize the text again their own way, so the datasets handed to them already hold
`prompt_ids` + `chosen_ids`/`rejected_ids` (pairs) or `completion_ids` + `label` (KTO), and the
trainers' dataset preparation keeps only what follows tokenization in TRL (the KL completions KTO
needs). Everything else (the losses, the reference model, the collators, reward logging) is TRL's.

The reference model: for a LoRA policy that continues the SFT adapter, TRL keeps a frozen copy of that
adapter ("ref") beside the trained one; for a LoRA policy started on the base, the reference is the
policy with its adapter disabled; for full fine-tuning, a frozen copy of the model (TRL's default).
"""

from __future__ import annotations

from typing import Any

def pair_rows(records: list) -> dict[str, list]:
    """Columns for a paired objective from PreferenceTokens."""
    return {"prompt_ids": [r.prompt_ids for r in records], "chosen_ids": [r.answers["chosen"] for r in records],
            "rejected_ids": [r.answers["rejected"] for r in records]}


def kto_rows(records: list, labels: list[bool]) -> dict[str, list]:
    """Columns for KTO from PreferenceTokens of unpaired records and their desirability labels."""
    return {"prompt_ids": [r.prompt_ids for r in records], "completion_ids": [r.answers["completion"] for r in records],
            "label": [bool(x) for x in labels]}


def kl_rotation(completions: list[list[int]], batch_size: int) -> list[list[int]]:
    """KTO's mismatched completions: within each batch, every prompt gets the previous record's
    completion (the first gets the batch's last), as TRL's KTOTrainer builds them."""
    rotated = []
    for start in range(0, len(completions), batch_size):
        batch = completions[start:start + batch_size]
        rotated += [batch[-1], *batch[:-1]]
    return rotated


def dpo_trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPO on datasets that already hold prompt_ids / chosen_ids / rejected_ids."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            _require(dataset, ("prompt_ids", "chosen_ids", "rejected_ids"), dataset_name)
            return dataset

    return PretokenizedDPOTrainer


def kto_trainer_class():
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """TRL's KTO on datasets that already hold prompt_ids / completion_ids / label."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            _require(dataset, ("prompt_ids", "completion_ids", "label"), dataset_name)
            if self.calculate_KL:
                dataset = dataset.add_column(
                    "KL_completion_ids", kl_rotation(list(dataset["completion_ids"]), args.per_device_train_batch_size))
            return dataset

    return PretokenizedKTOTrainer


def _require(dataset, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name} preference dataset lacks {missing}: ftq hands TRL pretokenized records only")


def dpo_config(cfg: dict[str, Any], common: dict[str, Any]):
    """TRL's DPOConfig (cfg: beta, loss_type, label_smoothing) with the shared training
    arguments `common` (TrainingArguments' names)."""
    from trl import DPOConfig

    return DPOConfig(**common, beta=float(cfg["beta"]), loss_type=[cfg["loss_type"]],
                     label_smoothing=float(cfg["label_smoothing"]), max_length=int(cfg["max_length"]),
                     precompute_ref_log_probs=False, remove_unused_columns=False)


def kto_config(cfg: dict[str, Any], common: dict[str, Any]):
    """TRL's KTOConfig (cfg: beta, desirable_weight, undesirable_weight) with the shared arguments."""
    from trl import KTOConfig

    return KTOConfig(**common, beta=float(cfg["beta"]), desirable_weight=float(cfg["desirable_weight"]),
                     undesirable_weight=float(cfg["undesirable_weight"]), max_length=int(cfg["max_length"]),
                     remove_unused_columns=False)
