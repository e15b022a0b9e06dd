"""A real `ftq serve` process on loopback serving the tiny model, driven by the official openai client."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import TINY_POLICY, start_server, stop


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tiny_model_dir):
    """The tiny model as a q8_0 GGUF (llama.cpp runtime)."""
    from ftq.quantize import gguf

    out = tmp_path_factory.mktemp("gguf")
    gguf.build(tiny_model_dir, out, gguf.validate({"type": "q8_0"}, "test"))
    return out / "model.gguf"


@pytest.fixture(scope="module")
def server(gguf_model):
    process, port, health = start_server(str(gguf_model), "--api-key", "sekrit", "--max-tokens-limit", "64")
    yield port, health
    stop(process)


def client(port, key="sekrit"):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def post(port, path, body: bytes, key="sekrit"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_names_what_is_served(server):
    _port, health = server
    assert health["status"] == "ok" and health["format"] == "gguf" and health["engine"] == "llama-server"
    assert health["model"].startswith("gguf")  # a local path is named by its folder


def test_openai_client_chat_stream_and_completions(server):
    port, health = server
    api = client(port)
    assert [m.id for m in api.models.list().data] == [health["model"]]
    reply = api.chat.completions.create(model=health["model"], messages=[{"role": "user", "content": "Hello"}],
                                        max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens <= 8
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(api.chat.completions.create(model=health["model"], messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same text either way
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    completion = api.completions.create(model=health["model"], prompt="Once upon a time", max_tokens=5, temperature=0)
    assert completion.object == "text_completion" and completion.usage.completion_tokens <= 5


def test_bad_requests_get_400_with_a_message(server):
    port, _ = server
    cases = [
        (b"{not json", "not valid JSON"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temprature": 1}', "temprature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}', "temperature"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "role"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', "limit of 64"),
        (b'{"messages": [{"role": "user", "content": "' + b"word " * 4000 + b'"}]}', "prompt is"),
    ]
    for body, expected in cases:
        status, payload = post(port, "/v1/chat/completions", body)
        assert status == 400 and expected in payload["error"]["message"], (body[:60], payload)
    status, payload = post(port, "/v1/completions", b'{"prompt": "x", "n": 2}')
    assert status == 400 and "n" in payload["error"]["message"]


def test_api_key_is_required_when_set(server):
    import openai

    port, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").models.list()
    status, payload = post(port, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', key="")
    assert status == 401 and "API key" in payload["error"]["message"]


def test_32_concurrent_streaming_clients_all_succeed(server):
    port, health = server

    def one(i):
        chunks = client(port).chat.completions.create(
            model=health["model"], messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=4,
            temperature=0, stream=True)
        return [c for c in chunks if c.choices][-1].choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32 and all(r in ("stop", "length") for r in results)


def test_binding_beyond_loopback_needs_an_api_key(gguf_model):
    env = {k: v for k, v in os.environ.items() if k != "FTQ_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "ftq", "serve", "--model", str(gguf_model), "--host", "0.0.0.0"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "--api-key" in result.stderr


def test_web_page_is_served_without_external_resources(server):
    port, health = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        page = response.read().decode()
    assert "/v1/chat/completions" in page and health["model"] in page
    assert "http://" not in page and "https://" not in page


def test_serve_resolves_the_champion_alias_and_follows_it_with_watch(evaluated):
    from mlflow.tracking import MlflowClient

    from conftest import load_params, set_params
    from ftq.stages import promote

    project, _ = evaluated
    old = os.getcwd()
    os.chdir(project)
    try:
        set_params(project, promote={"model_name": "served", "policy": TINY_POLICY})
        report = promote.run(load_params(project))
    finally:
        os.chdir(old)
    champion = report["champion"]["version"]
    process, port, health = start_server("models:/served@champion", "--watch", "1", cwd=project)
    try:
        assert (health["model"], health["version"], health["alias"]) == ("served", champion, "champion")
        assert client(port, key="x").chat.completions.create(
            model="served", messages=[{"role": "user", "content": "Hi"}], max_tokens=4).choices[0].message.role == "assistant"
        other = report["challenger"]
        MlflowClient(f"sqlite:///{project / 'mlflow.db'}").set_registered_model_alias("served", "champion", other)
        engines, refusals = watch_the_swap(process, port, other)
        # one model in memory: the old engine stopped before the new one started
        assert max(engines) == 1, f"{max(engines)} engines at once during the swap"
        # a request during the swap: 503 with Retry-After, never another error
        assert all(status == 503 and retry_after >= 1 for status, retry_after in refusals), refusals
    finally:
        stop(process)


def live_engine(child) -> bool:
    import psutil

    try:
        return "llama-server" in child.name() and child.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_the_swap(process, port, version, seconds=60) -> tuple[list[int], list[tuple[int, int]]]:
    """Until /health serves `version`: the llama-server engines alive at each look, and the refusals seen."""
    import psutil

    engines, refusals = [], []
    deadline = time.time() + seconds
    while time.time() < deadline:
        engines.append(sum(map(live_engine, psutil.Process(process.pid).children(recursive=True))))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if json.loads(response.read())["version"] == version:
                    return engines, refusals
        except urllib.error.HTTPError as exc:
            refusals.append((exc.code, int(exc.headers.get("Retry-After") or 0)))
        time.sleep(0.05)
    raise AssertionError(f"the server did not follow the alias within {seconds} s")


def test_unknown_alias_is_a_clear_error(evaluated):
    project, _ = evaluated
    result = subprocess.run([sys.executable, "-m", "ftq", "serve", "--model", "models:/nope@champion"], cwd=project,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "models:/nope@champion" in result.stderr


def test_terminal_chat_streams_keeps_history_and_resets(gguf_model):
    result = subprocess.run(
        [sys.executable, "-m", "ftq", "chat", "--model", str(gguf_model), "--max-tokens", "6", "--temperature", "0"],
        input="Hello\nAnd again\n/reset\n/what\nHi\n/exit\n", capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("model> ") == 3 and "(new conversation)" in out and "unknown command /what" in out


def test_web_page_exchanges_a_message_in_headless_chromium(server, tmp_path):
    from conftest import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port, _ = server
    driver = chromium(tmp_path)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "key").send_keys("sekrit")
        driver.find_element(By.ID, "input").send_keys("Hello there")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']") or d.find_elements(By.CSS_SELECTOR, ".error"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == "Hello there"
        shot = tmp_path / "web-chat.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        driver.quit()


def test_echo_logprobs_are_exact_and_tokenizer_endpoints_serve_the_models_vocabulary(server, gguf_model):
    """What lm-eval's local-completions relies on: token-id prompts, batched, echoed with the logprob of
    every token given the tokens before it (first one null), plus vLLM's /tokenize, /detokenize and
    /tokenizer_info. The logprobs must equal the runtime's own in-process scoring."""
    from ftq.runtimes.llamacpp import LlamaCppRuntime

    port, _health = server
    status, info = post(port, "/tokenize", json.dumps({"prompt": "The cat sat on the mat.", "add_special_tokens": False}).encode())
    assert status == 200 and info["count"] == len(info["tokens"]) > 3
    ids = info["tokens"]
    assert post(port, "/detokenize", json.dumps({"tokens": ids}).encode()) == (200, {"prompt": "The cat sat on the mat."})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/tokenizer_info", headers={"Authorization": "Bearer sekrit"})
    with urllib.request.urlopen(request, timeout=30) as response:
        tokenizer_info = json.loads(response.read())
    assert tokenizer_info["eos_token"] == "<|im_end|>" and "<|im_start|>" in tokenizer_info["chat_template"]
    status, body = post(port, "/v1/completions", json.dumps(
        {"model": "m", "prompt": [ids, ids[:3]], "max_tokens": 1, "temperature": 0, "logprobs": 2, "echo": True,
         "seed": 1234}).encode())
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    assert body["choices"][0]["text"].startswith("The cat sat on the mat.")
    runtime = LlamaCppRuntime(gguf_model, threads=1)
    nll, count = runtime.sequence_nll(ids)
    runtime.close()
    assert count == len(ids) - 1
    assert -sum(logprobs["token_logprobs"][1:len(ids)]) == pytest.approx(nll, rel=1e-4)
    for token_logprob, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert len(top) <= 2 and max(top.values()) >= token_logprob - 1e-6
    generated, top = logprobs["token_logprobs"][-1], logprobs["top_logprobs"][-1]
    assert generated == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert body["usage"]["prompt_tokens"] == len(ids) + 3
    assert post(port, "/v1/completions", json.dumps({"prompt": [ids], "max_tokens": 1, "echo": True,
                                                      "stream": True}).encode())[0] == 400
    assert post(port, "/v1/completions", json.dumps({"prompt": [10 ** 9], "max_tokens": 1}).encode())[0] == 400
