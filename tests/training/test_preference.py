"""TRL's preference trainers on ftq's pretokenized records (tiny model, real TRL, real PEFT)."""

from __future__ import annotations

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


def test_kl_rotation_matches_trl_within_each_batch():
    assert preference.kl_rotation([[1], [2], [3], [4], [5]], 2) == [[2], [1], [4], [3], [5]]


def test_pretokenized_dataset_without_ids_is_refused(tokenizer, tiny_model, tmp_path):
    from datasets import Dataset

    trainer_class = preference.dpo_trainer_class()
    args = preference.dpo_config({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "max_length": 256},
                                 {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "max_steps": 1})
    with pytest.raises(ValueError, match=r"train preference dataset lacks \['prompt_ids'"):
        trainer_class(model=tiny_model, args=args, train_dataset=Dataset.from_dict({"prompt": ["x"]}),
                      processing_class=tokenizer)


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
