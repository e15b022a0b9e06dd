"""Packing must be exact: the packed loss equals the padded-batch loss, so examples never see each other."""

import torch

from ftq.data.collate import packed, padded
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
