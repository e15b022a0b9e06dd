"""Preference objectives on TRL's trainers, fed ftq's own preference tokens.

ftq tokenizes preference records once (ftq.data.tokenize.tokenize_preference: the prompt's ids shared
exactly by both answers, each answer cut to the room left and named when it does not fit). TRL's
trainers would tokenize the text again their own way, so the datasets handed to them already hold
`prompt_ids` + `chosen_ids`/`rejected_ids` (pairs) or `completion_ids` + `label` (KTO), and the
trainers' dataset preparation keeps only what follows tokenization in TRL (the KL completions KTO
needs; for ORPO and SimPO, TRL's BOS and label steps, replayed on the ids). Everything else (the
losses, the reference model, the collators, reward logging) is TRL's.

The reference model: for a LoRA policy that continues the SFT adapter, TRL keeps a frozen copy of that
adapter ("ref") beside the trained one; for a LoRA policy started on the base, the reference is the
policy with its adapter disabled; for full fine-tuning, a frozen copy of the model (TRL's default).
ORPO and SimPO (on TRL's CPO trainer) have none.
"""

from __future__ import annotations

from typing import Any

from ftq.data.tokenize import IGNORE_INDEX

PAIRED = ("dpo", "orpo", "simpo")  # trained on (prompt, chosen, rejected); kto on unpaired labelled answers


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


def orpo_trainer_class():
    ORPOTrainer = _experimental("orpo").ORPOTrainer

    class PretokenizedORPOTrainer(_PretokenizedPairs, ORPOTrainer):
        """TRL's ORPO (reference-free) on datasets that already hold prompt_ids / chosen_ids / rejected_ids."""

    return PretokenizedORPOTrainer


def simpo_trainer_class():
    CPOTrainer = _experimental("cpo").CPOTrainer

    class PretokenizedSimPOTrainer(_PretokenizedPairs, CPOTrainer):
        """TRL's CPO trainer, run as SimPO by simpo_config, on pretokenized pairs."""

    return PretokenizedSimPOTrainer


class _PretokenizedPairs:
    """ORPO's and CPO's tokenization on ftq's ids: both trainers map the same `tokenize_row` over their
    datasets in __init__ (after two steps that leave id columns alone), so that row is all they lose."""

    def __init__(self, *args, train_dataset=None, eval_dataset=None, **kwargs):
        for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
            if dataset is not None:
                _require(dataset, ("prompt_ids", "chosen_ids", "rejected_ids"), name)
        super().__init__(*args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

    def tokenize_row(self, feature, model=None) -> dict:
        return pair_features(feature, self.processing_class.bos_token_id, self.max_length)


def pair_features(feature: dict, bos_token_id: int | None, max_length: int) -> dict[str, list]:
    """The columns TRL's ORPO/CPO `tokenize_row` makes for a decoder-only model, from ftq's ids: BOS before
    the prompt unless it starts with one (TRL's own helper), each answer cut to max_length - prompt,
    labels = input ids with the prompt masked.

    TRL's row would also append EOS to an answer whose last token is not EOS. A ChatML answer ends with
    the end-of-turn token and the template's newline, so that would teach a second end-of-turn the
    template never renders; TRL's DPOTrainer skips the step for chat data, and so does ftq for every
    objective: DPO, ORPO, SimPO and the held-out scores all see the answer's ids as the template renders
    them."""
    from trl.experimental.utils import add_bos_token_if_needed

    prompt_ids = list(feature["prompt_ids"])
    prompt = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    answers = {side: {**prompt, "input_ids": list(feature[f"{side}_ids"]),
                      "attention_mask": [1] * len(feature[f"{side}_ids"])} for side in ("chosen", "rejected")}
    n = len(prompt_ids)
    prompt, answers["chosen"], answers["rejected"] = add_bos_token_if_needed(
        bos_token_id, n, prompt, n, answers["chosen"], n, answers["rejected"])
    row = dict(prompt)
    for side, tokens in answers.items():
        start = len(tokens["prompt_input_ids"])
        ids = tokens["prompt_input_ids"] + tokens["input_ids"][:max(0, max_length - start)]
        row |= {f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                f"{side}_labels": [IGNORE_INDEX] * start + ids[start:]}
    return row


def _experimental(name: str):
    """trl.experimental.<name> without the notice TRL warns with on import: ftq pins TRL, and the tests here
    hold the experimental trainers to the behaviour ftq relies on."""
    import importlib
    import warnings

    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        return importlib.import_module(f"trl.experimental.{name}")


def _require(dataset, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name} preference dataset lacks {missing}: ftq hands TRL pretokenized records only")


def dpo_config(cfg: dict[str, Any], common: dict[str, Any]):
    """TRL's DPOConfig (cfg: beta, loss_type (one name or a list summed with loss_weights),
    label_smoothing) with the shared training arguments `common` (TrainingArguments' names)."""
    from trl import DPOConfig

    losses = [cfg["loss_type"]] if isinstance(cfg["loss_type"], str) else list(cfg["loss_type"])
    weights = cfg.get("loss_weights")
    return DPOConfig(**common, beta=float(cfg["beta"]), loss_type=losses,
                     loss_weights=[float(w) for w in weights] if weights else None,
                     label_smoothing=float(cfg["label_smoothing"]), max_length=int(cfg["max_length"]),
                     precompute_ref_log_probs=False, remove_unused_columns=False)


def kto_config(cfg: dict[str, Any], common: dict[str, Any]):
    """TRL's KTOConfig (cfg: beta, desirable_weight, undesirable_weight) with the shared arguments."""
    from trl import KTOConfig

    return KTOConfig(**common, beta=float(cfg["beta"]), desirable_weight=float(cfg["desirable_weight"]),
                     undesirable_weight=float(cfg["undesirable_weight"]), max_length=int(cfg["max_length"]),
                     remove_unused_columns=False)


def orpo_config(cfg: dict[str, Any], common: dict[str, Any]):
    """TRL's ORPOConfig (cfg: beta, the odds-ratio weight) with the shared arguments. max_completion_length
    (read for encoder-decoder models only) is max_length: ftq has already cut the records to fit."""
    ORPOConfig = _experimental("orpo").ORPOConfig

    return ORPOConfig(**common, beta=float(cfg["beta"]), max_length=int(cfg["max_length"]),
                      max_completion_length=int(cfg["max_length"]), remove_unused_columns=False)


def simpo_config(cfg: dict[str, Any], common: dict[str, Any]):
    """TRL's CPOConfig as pure SimPO (loss_type simpo, cpo_alpha 0: no NLL term, as in the SimPO paper and
    TRL's docs; cfg: beta, simpo_gamma, label_smoothing) with the shared arguments."""
    CPOConfig = _experimental("cpo").CPOConfig

    return CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=float(cfg["beta"]),
                     simpo_gamma=float(cfg["simpo_gamma"]), label_smoothing=float(cfg["label_smoothing"]),
                     max_length=int(cfg["max_length"]), max_completion_length=int(cfg["max_length"]),
                     remove_unused_columns=False)


_OBJECTIVES = {"dpo": (dpo_trainer_class, dpo_config), "orpo": (orpo_trainer_class, orpo_config),
               "simpo": (simpo_trainer_class, simpo_config), "kto": (kto_trainer_class, kto_config)}


def trainer_and_config(objective: str, cfg: dict[str, Any], common: dict[str, Any]):
    """The trainer class and TRL config of a preference objective (dpo, orpo, simpo or kto)."""
    if objective not in _OBJECTIVES:
        raise ValueError(f"unknown preference objective {objective!r}: one of {list(_OBJECTIVES)}")
    from ftq.training.launch import one_gpu_per_process

    trainer_class, config = _OBJECTIVES[objective]
    args = config(cfg, common)
    one_gpu_per_process(args)  # never nn.DataParallel over every visible GPU
    return trainer_class(), args


# Vocabulary rows per chunk of TRL's fused LM head (DPO's and KTO's log-probs) off CUDA. Its backward sums
# each chunk's gradient GEMM in float32, which on CPU it does by copying that chunk of the LM head to float32:
# TRL's 32768 rows made a 268 MB copy on every backward of a 2048-wide 1B model, the DPO stage's peak
# (1.69x the model's bytes with the rest of this stage's bounds, 1.56x at 4096 rows; bench/scale.py).
CPU_LM_HEAD_CHUNK = 4096


def bound_fused_lm_head(on_cuda: bool) -> None:
    """Off CUDA, TRL's fused LM head works through the vocabulary CPU_LM_HEAD_CHUNK rows at a time. TRL has
    no setting for it; its module constant is read on every forward (a test checks it is still there)."""
    if on_cuda:
        return  # there TRL accumulates in float32 inside the GEMM (out_dtype), without a copy
    import trl.trainer.utils as trl_utils

    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, CPU_LM_HEAD_CHUNK)


def reference_free(objective: str) -> bool:
    """Whether the objective trains without a reference model (ORPO, SimPO), so nothing is kept frozen."""
    return objective in ("orpo", "simpo")
