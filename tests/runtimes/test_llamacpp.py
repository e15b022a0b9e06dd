"""The llama.cpp runtime holds one llama.cpp model per GGUF: chats and scoring share it (on a GPU a second
Llama is a second copy of the weights in VRAM). Real llama.cpp objects on the tiny model's GGUF, on CPU."""

import numpy as np
import pytest

from ftq.runtimes.llamacpp import LlamaCppRuntime

MESSAGES = [{"role": "user", "content": "Name a colour and a fruit."}]


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tiny_model_dir):
    from ftq.quantize import gguf

    out = tmp_path_factory.mktemp("gguf")
    gguf.build(tiny_model_dir, out, gguf.validate({"type": "q8_0"}, "test"))
    return out / "model.gguf"


@pytest.fixture()
def constructed(monkeypatch):
    """Every llama_cpp.Llama this test constructs (each one real), by its n_gpu_layers."""
    from llama_cpp import Llama

    made, original = [], Llama.__init__

    def recording(self, *args, **kwargs):
        made.append(kwargs.get("n_gpu_layers"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "__init__", recording)
    return made


def streamed(runtime, messages):
    return "".join(runtime.stream_chat(messages, max_new_tokens=12)).strip()


def test_chats_and_scores_share_one_llama(gguf_model, constructed):
    runtime = LlamaCppRuntime(gguf_model, threads=1, n_ctx=512)
    first = runtime.chat(MESSAGES, max_new_tokens=12)
    prompt = runtime.prompt_tokens(MESSAGES)
    ids = [int(t) for t in np.random.default_rng(0).integers(10, 4000, size=prompt + 40)]
    nll, _ = runtime.sequence_nll(ids)
    logits = runtime.logits(ids[:20])
    assert runtime.chat(MESSAGES, max_new_tokens=12) == first  # scoring between answers changes nothing
    assert runtime.sequence_nll(ids)[0] == pytest.approx(nll, rel=1e-5)  # nor does a chat change a score
    assert np.abs(runtime.logits(ids[:20]) - logits).max() < 1e-4
    assert len(constructed) == 1  # one model (and one context) for all of it
    runtime.close()


def test_a_stream_after_scoring_reuses_no_scored_cache():
    """stream_chat keeps llama-cpp-python's prefix reuse: after scoring, the ids it compares its prompt with
    must be the scored ones (the cache holds them), or it would continue a chat's prompt on a cache that
    holds the scored tokens. On the embedded SmolLM2 (the tiny random model's answers hardly depend on
    their context)."""
    from ftq.stages.base import embedded_gguf

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    fresh = LlamaCppRuntime(embedded_gguf(), threads=2, n_ctx=512)
    expected = streamed(fresh, messages)
    fresh.close()
    runtime = LlamaCppRuntime(embedded_gguf(), threads=2, n_ctx=512)
    runtime.chat(messages, max_new_tokens=12)  # the context's ids now begin with this prompt
    scored = runtime.tokenize("Bananas are yellow, the sea is deep and trains run late on Sundays. " * 4)
    runtime.logits(scored)
    llm = runtime.llama
    assert list(llm.input_ids[: llm.n_tokens]) == scored  # the bookkeeping says what the cache holds
    assert streamed(runtime, messages) == expected
    runtime.close()


def test_the_servers_logprob_runtime_keeps_its_weights_off_the_gpu(gguf_model, constructed, monkeypatch):
    """`ftq serve` answers exact-logprob requests with an in-process runtime beside llama-server: on a GPU
    build (here: gpu_layers() answering -1, as it does where a GPU answers) that second copy of the
    weights must stay in RAM, or a GGUF over half the card could not be served with logprobs."""
    from ftq.registry.resolve import Resolved
    from ftq.runtimes import llamacpp
    from ftq.serve.host import Served

    monkeypatch.setattr(llamacpp, "gpu_layers", lambda: -1)
    served = Served(Resolved(model_uri=str(gguf_model), path=gguf_model, name="tiny"), engine=None, format="gguf")
    runtime = served.logprob_runtime(n_ctx=256)
    runtime.llama  # load it
    assert constructed == [0]
    runtime.close()
    assert LlamaCppRuntime(gguf_model, threads=1, n_ctx=256).llama is not None and constructed[-1] == -1  # the default
