"""Both engines behind a real `ftq serve`: concurrent requests are decoded together and each keeps its own
settings. Batching must not change answers (greedy alone == greedy in a batch of 8), `ignore_eos` fixes
the length, stop strings cut the text, and (llama-server) a seed reproduces a sampled answer in a batch."""

import concurrent.futures
import json
import urllib.request

import pytest

from conftest import start_server, stop

PROMPTS = ["Hi", "Tell me a story", "What is 2+2?", "Name a colour", "Count to five", "Who are you?",
           "Say something", "Write a word"]


@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory, tokenizer):
    """The tiny model with large weights: its greedy answers differ by prompt (the default tiny model's
    near-uniform logits answer every prompt the same), so a mixed-up batch would show."""
    import torch

    from conftest import build_tiny_model

    model = build_tiny_model(tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("peaky")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gguf", "hf"])
def served(request, tmp_path_factory, peaky_model_dir):
    if request.param == "gguf":
        from ftq.quantize import gguf

        out = tmp_path_factory.mktemp("gguf")
        gguf.build(peaky_model_dir, out, gguf.validate({"type": "q8_0"}, "test"))
        model = out / "model.gguf"
    else:
        model = peaky_model_dir
    process, port, health = start_server(str(model), "--parallel", "8", "--ctx-size", "512")
    yield port, health
    stop(process)


def chat(port, **body) -> dict:
    payload = json.dumps({"temperature": 0, "max_tokens": 24, **body}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=payload, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def ask(port, prompt, **body) -> dict:
    return chat(port, messages=[{"role": "user", "content": prompt}], **body)


def test_the_engine_is_the_batching_one(served):
    _, health = served
    assert health["engine"] == {"gguf": "llama-server", "hf": "transformers"}[health["format"]]
    assert health["parallel"] == 8


def test_greedy_answers_are_the_same_alone_and_in_a_batch_of_8(served):
    port, _ = served
    alone = [ask(port, p, ignore_eos=True)["choices"][0]["message"]["content"] for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: ask(port, p, ignore_eos=True)["choices"][0]["message"]["content"], PROMPTS))
    assert together == alone
    assert len(set(alone)) > 1  # different prompts, different answers: the test can tell them apart


def test_ignore_eos_fixes_the_length_and_stop_strings_cut(served):
    port, _ = served
    reply = ask(port, "Hi", max_tokens=17, ignore_eos=True)
    assert reply["usage"]["completion_tokens"] == 17 and reply["choices"][0]["finish_reason"] == "length"
    text = ask(port, "Tell me a story", max_tokens=32, ignore_eos=True)["choices"][0]["message"]["content"]
    word = next(w for w in text.split()[2:] if len(w) > 2)
    cut = ask(port, "Tell me a story", max_tokens=32, ignore_eos=True, stop=[word])["choices"][0]
    assert cut["message"]["content"] == text[: text.index(word)] and cut["finish_reason"] == "stop"


def test_a_seed_reproduces_a_sampled_answer_inside_a_batch(served):
    port, health = served
    if health["engine"] != "llama-server":
        pytest.skip("transformers' continuous batching samples from one generator per engine, not per request")
    def sampled(seed):
        return ask(port, "Tell me a story", temperature=1.0, seed=seed, max_tokens=32,
                   ignore_eos=True)["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(sampled, [7, 7, 7, 7, 8, 9, 10, 11]))
    assert len(set(answers[:4])) == 1 and len(set(answers)) > 1
