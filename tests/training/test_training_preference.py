"""TRL's preference trainers on ftq's pretokenized records (tiny model, real TRL, real PEFT)."""

from __future__ import annotations

import inspect

import pytest
import torch

from ftq.data.tokenize import tokenize_preference
from ftq.training import preference


def pairs(tokenizer, n: int = 8):
    records = []
    for i in range(n):
        record = {"prompt": [{"role": "user", "content": f"Order {i}: 3 staplers for Ana, ship to Lima."}],
                  "chosen": {"role": "assistant", "content": '{"customer": "Ana", "city": "Lima"}'},
                  "rejected": {"role": "assistant", "content": '{"customer": "Lima", "city": "Lima"}'}}
        records.append(tokenize_preference(tokenizer, record, 256))
    return records


SETTINGS = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "simpo_gamma": 0.5, "desirable_weight": 1.0,
            "undesirable_weight": 1.0, "max_length": 256}


def test_kl_rotation_matches_trl_within_each_batch():
    assert preference.kl_rotation([[1], [2], [3], [4], [5]], 2) == [[2], [1], [4], [3], [5]]


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "kto"])
def test_pretokenized_dataset_without_ids_is_refused(objective, tokenizer, tiny_model, tmp_path):
    from datasets import Dataset

    trainer_class, args = preference.trainer_and_config(
        objective, SETTINGS, {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "max_steps": 1})
    with pytest.raises(ValueError, match=r"train preference dataset lacks \['prompt_ids'"):
        trainer_class(model=tiny_model, args=args, train_dataset=Dataset.from_dict({"prompt": ["x"]}),
                      processing_class=tokenizer)


def test_dpo_losses_combine_as_trl_sums_them():
    """loss_type [sigmoid, sft] with loss_weights: TRL's DPOConfig gets both, weighted (RPO: DPO plus the
    chosen answers' NLL); a single name stays TRL's one-item list."""
    common = {"output_dir": "unused", "use_cpu": True, "report_to": "none"}
    cfg = {"beta": 0.1, "label_smoothing": 0.0, "max_length": 256}
    both = preference.dpo_config({**cfg, "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5]}, common)
    assert (both.loss_type, both.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])
    one = preference.dpo_config({**cfg, "loss_type": "ipo"}, common)
    assert (one.loss_type, one.loss_weights) == (["ipo"], None)


def test_dpo_continues_the_sft_adapter_against_a_frozen_copy_of_it(tokenizer, tiny_model, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    args = preference.dpo_config({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "max_length": 256},
                                 {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "max_steps": 2,
                                  "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
                                  "save_strategy": "no"})
    trainer = preference.dpo_trainer_class()(model=model, args=args, processing_class=tokenizer,
                                             train_dataset=Dataset.from_dict(preference.pair_rows(pairs(tokenizer))))
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert logged and all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged[0])
    # the reference is the SFT adapter as it was: a frozen "ref" copy; the trained one moved
    ref = {n.replace(".ref.", ".default."): p for n, p in model.named_parameters() if ".ref." in n}
    assert ref and all(not p.requires_grad for p in ref.values())
    assert all(torch.equal(ref[n], before[n]) for n in before)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_kto_trains_on_labelled_single_answers(tokenizer, tiny_model, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    records, labels = [], []
    for pair in pairs(tokenizer):
        for side, label in (("chosen", True), ("rejected", False)):
            records.append(type(pair)(pair.prompt_ids, {"completion": pair.answers[side]}))
            labels.append(label)
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    args = preference.kto_config({"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "max_length": 256},
                                 {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "max_steps": 2,
                                  "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
                                  "save_strategy": "no"})
    trainer = preference.kto_trainer_class()(model=model, args=args, processing_class=tokenizer,
                                             train_dataset=Dataset.from_dict(preference.kto_rows(records, labels)))
    assert trainer.train_dataset["KL_completion_ids"][:4] == [records[3].answers["completion"],
                                                             *[r.answers["completion"] for r in records[:3]]]
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert logged and all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)


def test_each_objective_gets_its_trainer_and_config(tmp_path):
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "max_steps": 1}
    expected = {"dpo": (DPOTrainer, DPOConfig), "orpo": (ORPOTrainer, ORPOConfig), "simpo": (CPOTrainer, CPOConfig),
                "kto": (KTOTrainer, KTOConfig)}
    for objective, (trainer, config) in expected.items():
        trainer_class, args = preference.trainer_and_config(objective, SETTINGS, common)
        assert issubclass(trainer_class, trainer) and type(args) is config and not args.remove_unused_columns
        assert args.max_length == 256 and preference.reference_free(objective) == (objective in ("orpo", "simpo"))
    simpo = preference.trainer_and_config("simpo", SETTINGS, common)[1]
    assert (simpo.loss_type, simpo.cpo_alpha, simpo.simpo_gamma) == ("simpo", 0.0, 0.5)
    assert simpo.max_completion_length == 256
    assert preference.PAIRED == ("dpo", "orpo", "simpo")
    with pytest.raises(ValueError, match="unknown preference objective 'ppo'"):
        preference.trainer_and_config("ppo", SETTINGS, common)


def test_pair_features_add_bos_where_trl_would_no_eos_and_cut_answers_to_max_length():
    row = preference.pair_features({"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 10]},
                                   bos_token_id=1, max_length=5)
    assert row == {"prompt_input_ids": [1, 5, 6], "prompt_attention_mask": [1, 1, 1],
                   "chosen_input_ids": [1, 5, 6, 7, 2], "chosen_attention_mask": [1] * 5,
                   "chosen_labels": [-100, -100, -100, 7, 2],
                   "rejected_input_ids": [1, 5, 6, 8, 9], "rejected_attention_mask": [1] * 5,
                   "rejected_labels": [-100, -100, -100, 8, 9]}


def reference_free_run(objective: str, tokenizer, model, tmp_path):
    """Two steps of `objective` on a LoRA-wrapped tiny model: (trainer, the records, LoRA weights before)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    records = pairs(tokenizer)
    trainer_class, args = preference.trainer_and_config(
        objective, {**SETTINGS, "beta": 2.0} if objective == "simpo" else SETTINGS,
        {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "max_steps": 2,
         "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no"})
    trainer = trainer_class(model=model, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_dict(preference.pair_rows(records)))
    return trainer, records, before


def assert_trl_tokenization(trainer, trl_class, record, tokenizer):
    """Row 0 is ftq's ids + TRL's steps: the prompt (it starts with BOS, so none is added), prompt + answer
    as the template renders it (ending with end-of-turn and a newline: no EOS appended, see pair_features),
    labels masking the prompt; and, but for that EOS, the row TRL's own tokenize_row makes from the text."""
    row, eos, prompt = trainer.train_dataset[0], tokenizer.eos_token_id, record.prompt_ids
    assert prompt[0] == tokenizer.bos_token_id and row["prompt_input_ids"] == prompt
    text = {"prompt": tokenizer.decode(prompt), **{side: tokenizer.decode(ids) for side, ids in record.answers.items()}}
    trl_row = trl_class.tokenize_row(trainer, text)
    for side in ("chosen", "rejected"):
        answer = record.answers[side]
        assert tokenizer.decode(answer).endswith("<|im_end|>\n") and answer[-1] != eos
        assert row[f"{side}_input_ids"] == prompt + answer
        assert row[f"{side}_labels"] == [-100] * len(prompt) + answer
        assert row[f"{side}_attention_mask"] == [1] * (len(prompt) + len(answer))
        assert trl_row[f"{side}_input_ids"] == row[f"{side}_input_ids"] + [eos]
        assert trl_row[f"{side}_labels"] == row[f"{side}_labels"] + [eos]
    assert trl_row["prompt_input_ids"] == row["prompt_input_ids"]


def assert_trained_without_reference(trainer, before, metrics):
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", *metrics} <= set(logged[0])
    model = trainer.model
    assert not any(".ref." in n for n, _ in model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_orpo_trains_on_ftq_ids_tokenized_as_trl_would(tokenizer, tiny_model, tmp_path):
    from trl.experimental.orpo import ORPOTrainer

    trainer, records, before = reference_free_run("orpo", tokenizer, tiny_model, tmp_path)
    assert_trl_tokenization(trainer, ORPOTrainer, records[0], tokenizer)
    trainer.train()
    assert_trained_without_reference(trainer, before, {"log_odds_ratio", "log_odds_chosen", "nll_loss"})


def test_simpo_trains_on_ftq_ids_tokenized_as_trl_would(tokenizer, tiny_model, tmp_path):
    from trl.experimental.cpo import CPOTrainer

    trainer, records, before = reference_free_run("simpo", tokenizer, tiny_model, tmp_path)
    assert_trl_tokenization(trainer, CPOTrainer, records[0], tokenizer)
    trainer.train()
    assert_trained_without_reference(trainer, before, {"logps/chosen", "logps/rejected"})
    assert all(row["nll_loss"] == 0.0 for row in trainer.state.log_history if "loss" in row)


def test_the_cpu_bound_on_trls_fused_lm_head_reaches_the_constant_trl_reads():
    """TRL has no setting for its fused LM head's vocabulary chunk: ftq lowers the module constant its
    forward reads (a float32 copy of each chunk is made on every CPU backward). Renamed in a TRL upgrade,
    the bound would silently stop applying: this fails instead."""
    import trl.trainer.utils as trl_utils

    from ftq.training.preference import CPU_LM_HEAD_CHUNK, bound_fused_lm_head

    before = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    assert "_CHUNKED_LOGPROB_CHUNK_SIZE" in inspect.getsource(trl_utils.add_fused_lm_head)
    try:
        bound_fused_lm_head(on_cuda=True)
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == before
        bound_fused_lm_head(on_cuda=False)
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == min(before, CPU_LM_HEAD_CHUNK)
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = before
