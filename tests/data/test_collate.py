"""Packing must be exact: the packed loss equals the padded-batch loss, so examples never see each other."""

import pytest
import torch

from ftq.data.collate import at_label_positions, packed, padded, takes_label_positions
from ftq.data.tokenize import tokenize_conversation


def features(tokenizer):
    conversations = [
        [("user", "What is 2+2?"), ("assistant", "4")],
        [("user", "Name three colours."), ("assistant", "Red, green and blue.")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Goodbye.")],
    ]
    out = []
    for turns in conversations:
        conv = {"messages": [{"role": r, "content": c} for r, c in turns], "tools": None}
        example = tokenize_conversation(tokenizer, conv, max_length=256)
        out.append({"input_ids": example.input_ids, "labels": example.labels})
    return out


def test_packed_loss_equals_padded_loss(tiny_model, tokenizer):
    tiny_model.eval()
    batch = features(tokenizer)
    with torch.no_grad():
        padded_loss = tiny_model(**padded(batch, tokenizer.pad_token_id)).loss
        packed_loss = tiny_model(**packed(batch), use_cache=False).loss
    assert torch.allclose(padded_loss, packed_loss, atol=1e-5), (padded_loss, packed_loss)


def test_packed_without_isolation_would_differ(tiny_model, tokenizer):
    """Guards the test above: plain concatenation (no position restarts) changes the loss."""
    tiny_model.eval()
    batch = features(tokenizer)
    row = packed(batch)
    with torch.no_grad():
        isolated = tiny_model(**row, use_cache=False).loss
        leaky = tiny_model(input_ids=row["input_ids"], labels=row["labels"], use_cache=False).loss
    assert not torch.allclose(isolated, leaky, atol=1e-4)


def test_padded_batch_layout(tokenizer):
    batch = padded([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def _loss_and_grads(model, batch, num_items=None):
    model.zero_grad()
    extra = {"num_items_in_batch": num_items} if num_items is not None else {}
    loss = model(**batch, use_cache=False, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_logits_at_label_positions_give_the_same_loss_and_gradients(tiny_model, tokenizer, layout):
    """The lm_head and cross-entropy at label positions only: the loss and every gradient of the full
    logits, with the Trainer's own normalizer (num_items_in_batch) too; and far fewer logits."""
    tiny_model.train()
    tiny_model.config.use_cache = False
    rows = features(tokenizer)
    full = padded(rows, tokenizer.pad_token_id) if layout == "padded" else packed(rows)
    reduced = at_label_positions(full)
    assert takes_label_positions(tiny_model)
    kept = reduced["logits_to_keep"].numel()
    assert kept < full["input_ids"].shape[1] / 2  # the prompts are most of these rows
    assert (reduced["shift_labels"] != -100).sum() == (full["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        assert tiny_model(**reduced).logits.shape[1] == kept
    for num_items in (None, (full["labels"] != -100).sum()):
        loss, grads = _loss_and_grads(tiny_model, full, num_items)
        loss_at, grads_at = _loss_and_grads(tiny_model, reduced, num_items)
        assert torch.allclose(loss, loss_at, atol=1e-6), (loss, loss_at)
        assert grads.keys() == grads_at.keys() and grads
        for name in grads:
            assert torch.allclose(grads[name], grads_at[name], atol=1e-6, rtol=1e-4), name


def test_label_positions_with_a_wrong_shift_would_differ(tiny_model, tokenizer):
    """Guards the test above: labels gathered one position off change the loss."""
    rows = features(tokenizer)
    full = padded(rows, tokenizer.pad_token_id)
    reduced = at_label_positions(full)
    off = {**reduced, "shift_labels": full["labels"][:, reduced["logits_to_keep"]].contiguous()}
    with torch.no_grad():
        assert not torch.allclose(tiny_model(**reduced).loss, tiny_model(**off).loss, atol=1e-3)
