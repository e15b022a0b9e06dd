import pytest

from ftq.data.tokenize import IGNORE_INDEX, assistant_spans, tokenize_conversation


def conversation(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"messages": messages, "tools": None}


def target_text(tokenizer, example):
    """Decoded label runs, one string per contiguous labelled span."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_labels_only_on_assistant_turns_including_end_token(tokenizer):
    example = tokenize_conversation(tokenizer, conversation("What is 2+2?", "4"), max_length=512)
    assert target_text(tokenizer, example) == ["4<|im_end|>\n"]
    # everything up to the assistant's header (system, user turn, "<|im_start|>assistant\n") is masked
    prompt = tokenizer.apply_chat_template(conversation("What is 2+2?")["messages"], tokenize=False,
                                           add_generation_prompt=True)
    head = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert head > 10 and tokenizer.decode(example.input_ids[:head]) == prompt
    assert set(example.labels[:head]) == {IGNORE_INDEX} and example.labels[head] != IGNORE_INDEX


def test_every_assistant_turn_of_a_multi_turn_conversation_is_a_target(tokenizer):
    example = tokenize_conversation(
        tokenizer, conversation("Hi", "Hello!", "Name a colour.", "Blue.", system="Be brief."), max_length=512
    )
    assert target_text(tokenizer, example) == ["Hello!<|im_end|>\n", "Blue.<|im_end|>\n"]
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_tokens_match_the_rendered_chat_template(tokenizer):
    conv = conversation("Hi", "Hello!")
    example = tokenize_conversation(tokenizer, conv, max_length=512)
    rendered = tokenizer.apply_chat_template(conv["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered


def test_right_truncation_keeps_the_start_and_drops_targetless(tokenizer):
    conv = conversation("Tell me a story. " * 20, "Once upon a time " * 20)
    full = tokenize_conversation(tokenizer, conv, max_length=4096)
    cut_at = len(full.input_ids) - 10
    cut = tokenize_conversation(tokenizer, conv, max_length=cut_at)
    assert cut.truncated and cut.input_ids == full.input_ids[:cut_at] and cut.labels == full.labels[:cut_at]
    first_target = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert tokenize_conversation(tokenizer, conv, max_length=first_target) is None
    assert tokenize_conversation(tokenizer, conv, max_length=cut_at, truncation="drop") is None


def test_non_prefix_stable_template_is_refused(tokenizer):
    from ftq.data.tokenize import TemplateError

    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    # a template that reorders turns: prefixes are not prefixes of the full text
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError):
        assistant_spans(tokenizer, conversation("a", "b", "c", "d")["messages"])


def test_both_answers_of_a_pair_follow_the_same_prompt_tokens(tokenizer):
    from ftq.data.tokenize import tokenize_preference

    record = {"prompt": [{"role": "user", "content": "Order: 2 lamps for Ana in Lima."}],
              "chosen": {"role": "assistant", "content": '{"customer": "Ana", "city": "Lima"}'},
              "rejected": {"role": "assistant", "content": '{"customer": "Lima", "city": "Lima"}'}, "tools": None}
    tokens = tokenize_preference(tokenizer, record, max_length=512)
    for side in ("chosen", "rejected"):
        whole = tokenize_conversation(tokenizer, {"messages": [*record["prompt"], record[side]], "tools": None}, 512)
        assert tokens.prompt_ids + tokens.answers[side] == whole.input_ids  # the SFT tokenization, split
        assert tokenizer.decode(tokens.answers[side]).endswith("<|im_end|>\n")
    assert tokens.truncated == []


def test_a_pair_too_long_is_cut_and_says_which_answer_or_dropped(tokenizer):
    from ftq.data.tokenize import tokenize_preference

    record = {"prompt": [{"role": "user", "content": "Say something."}],
              "chosen": {"role": "assistant", "content": "short"},
              "rejected": {"role": "assistant", "content": "long " * 200}, "tools": None}
    prompt_length = len(tokenize_preference(tokenizer, record, 4096).prompt_ids)
    tokens = tokenize_preference(tokenizer, record, max_length=prompt_length + 20)
    assert tokens.truncated == ["rejected"] and len(tokens.answers["rejected"]) == 20
    assert tokenizer.decode(tokens.answers["chosen"]).endswith("<|im_end|>\n")  # the short side kept whole
    assert tokenize_preference(tokenizer, record, prompt_length + 20, truncation="drop") is None
    assert tokenize_preference(tokenizer, record, prompt_length) is None  # no room for an answer
