"""A real `ftq serve` (gateway + llama-server engine) under ordinary abuse: clients that leave mid-answer,
a full queue, huge bodies, long prompts, oversized batches, probing without the key, a hostile model name."""

import json
import shutil
import socket
import threading
import time
import urllib.request

import pytest

from conftest import start_server, stop

KEY = "sekrit"
LONG = 6000  # tokens a slot would spend on an abandoned answer if it were not cancelled


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tokenizer):
    """The tiny model with a trained context of 8k tokens: llama-server stops a sequence at the model's
    context, and an abandoned answer must be able to run long enough to show."""
    from conftest import build_tiny_model
    from ftq.quantize import gguf

    model = build_tiny_model(tokenizer)
    model.config.max_position_embeddings = 8192
    folder = tmp_path_factory.mktemp("tiny-long")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path_factory.mktemp("gguf")
    gguf.build(folder, out, gguf.validate({"type": "q8_0"}, "test"))
    return out / "model.gguf"


@pytest.fixture(scope="module")
def one_slot(gguf_model):
    """One engine slot and room for one waiting request: every request that should have left shows."""
    process, port, _ = start_server(str(gguf_model), "--api-key", KEY, "--parallel", "1", "--max-queued", "1",
                                    "--ctx-size", "8192", "--max-tokens-limit", str(LONG),
                                    "--max-body-bytes", "1000000")
    yield port, process
    stop(process)


def request(port, path, body=None, key=KEY, timeout=60):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data is not None else "GET",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def health(port, key=KEY):
    return json.loads(request(port, "/health", key=key)[2])


def metric(port, name):
    from prometheus_client.parser import text_string_to_metric_families

    text = request(port, "/metrics")[2].decode()
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def open_stream(port, max_tokens=LONG, stream=True) -> socket.socket:
    """A raw HTTP request on a socket; with `stream`, returns once the first event has arrived."""
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": stream, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    if stream:
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def short_answer_seconds(port) -> float:
    started = time.perf_counter()
    status, _, body = request(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 8, "temperature": 0}, timeout=120)
    assert status == 200, body
    return time.perf_counter() - started


def wait_idle(port, seconds=10.0) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        answer = health(port)
        if answer["active"] == 0 and answer["queued"] == 0:
            return answer
        time.sleep(0.1)
    raise AssertionError(f"still busy after {seconds} s: {answer}")


def engine_busy(process) -> bool:
    """Whether the llama-server engine behind the gateway is decoding anything, from its own /slots."""
    import psutil

    from ftq.engines.llama_server import UnixConnection

    engine = next(p for p in psutil.Process(process.pid).children(recursive=True) if "llama-server" in p.name())
    args = engine.cmdline()
    # the engine's socket and key, as only the gateway (and this user, through /proc) can know them
    connection = UnixConnection(args[args.index("--host") + 1], timeout=10)
    try:
        connection.request("GET", "/slots", headers={"Authorization": f"Bearer {engine.environ()['LLAMA_API_KEY']}"})
        return any(slot["is_processing"] for slot in json.loads(connection.getresponse().read()))
    finally:
        connection.close()


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_stops_its_generation(one_slot):
    port, process = one_slot
    baseline = short_answer_seconds(port)
    before = sum(metric(port, "ftq_generation_tokens_total").values())
    sock = open_stream(port)
    assert health(port)["active"] == 1 and engine_busy(process)
    sock.close()  # the browser tab closes after the first chunk
    wait_idle(port, 5)
    deadline = time.time() + 2
    while engine_busy(process):  # the engine itself stops decoding the abandoned answer
        assert time.time() < deadline, "llama-server still decoding 2 s after the client left"
        time.sleep(0.1)
    # one slot: had the engine kept decoding the 6000-token answer, this would wait behind it
    assert short_answer_seconds(port) < max(5.0, 5 * baseline)
    generated = sum(metric(port, "ftq_generation_tokens_total").values()) - before
    assert generated < LONG / 4, generated
    assert sum(metric(port, "ftq_client_disconnects_total").values()) >= 1


def test_a_client_that_leaves_a_non_streaming_request_frees_its_slot(one_slot):
    port, process = one_slot
    sock = open_stream(port, stream=False)
    deadline = time.time() + 10
    while health(port)["active"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    sock.close()
    wait_idle(port, 5)
    time.sleep(0.5)
    assert not engine_busy(process)
    assert short_answer_seconds(port) < 5.0


def test_an_abandoned_answer_would_keep_the_engine_busy_for_longer_than_the_test_waits(one_slot):
    """The baseline for the disconnect tests: the same 6000-token answer, left to run, takes the engine
    well over the 2 s they allow for it to stop."""
    port, _ = one_slot
    started = time.perf_counter()
    status, _, body = request(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": LONG, "ignore_eos": True}, timeout=120)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == LONG
    seconds = time.perf_counter() - started
    print(f"abandoned answer: {LONG} tokens in {seconds:.1f} s")
    assert seconds > 4


def test_a_full_queue_answers_503_with_retry_after_and_recovers(one_slot):
    port, _ = one_slot
    running = open_stream(port)
    waiting = threading.Thread(target=lambda: request(port, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=120), daemon=True)
    waiting.start()
    deadline = time.time() + 10
    while health(port)["queued"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert health(port)["queued"] == 1
    status, headers, body = request(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 503 and int(headers["Retry-After"]) >= 1 and b"server busy" in body
    running.close()
    waiting.join(60)
    wait_idle(port, 10)
    assert short_answer_seconds(port) < 10


def test_bodies_over_the_limit_get_413_before_they_are_read(one_slot):
    port, process = one_slot
    rss_before = rss(process.pid)
    # a declared 30 MB body: refused from the headers alone, while nothing of it has been sent
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 30000000\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    sock.close()
    # a chunked body that turns out too large is cut off as it is read
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    answer = b""
    try:
        for _ in range(40):  # 2.6 MB against a 1 MB limit
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    except OSError:
        pass  # the server answered and closed while we were still sending
    sock.settimeout(10)
    try:
        answer = sock.recv(4096)
    except OSError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert short_answer_seconds(port) < 10
    assert rss(process.pid) < rss_before + 50_000_000


def test_a_long_prompt_is_refused_without_holding_up_others(one_slot):
    port, _ = one_slot
    result = {}
    text = "word " * 180000  # 900 kB: under the body limit, ~180k tokens against a 3072-token prompt limit
    thread = threading.Thread(target=lambda: result.update(answer=request(
        port, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 4})))
    thread.start()
    assert short_answer_seconds(port) < 10  # nothing waits on the counting
    thread.join(60)
    status, _, body = result["answer"]
    assert status == 400 and b"prompt is" in body and b"tokens" in body
    assert wait_idle(port)["active"] == 0


def test_completion_batches_count_against_the_limits_as_a_whole(one_slot):
    port, _ = one_slot
    ids = json.loads(request(port, "/tokenize", {"prompt": "The cat sat on the mat."})[2])["tokens"]
    status, _, body = request(port, "/v1/completions", {"prompt": [ids] * 40, "max_tokens": 1, "echo": True,
                                                        "logprobs": 0})
    assert status == 400 and b"40 prompts" in body
    status, _, body = request(port, "/v1/completions", {"prompt": [ids] * 8, "max_tokens": 3000})
    assert status == 400 and b"this batch needs" in body
    status, _, body = request(port, "/v1/completions", {"prompt": [ids] * 4, "max_tokens": 1, "echo": True,
                                                        "logprobs": 0})
    assert status == 200 and len(json.loads(body)["choices"]) == 4


def test_tokenize_obeys_the_key_and_the_limits(one_slot):
    port, _ = one_slot
    assert request(port, "/tokenize", {"prompt": "hi"}, key="wrong")[0] == 401
    assert request(port, "/tokenize", {"prompt": "hi"}, key="sekrit-but-longer")[0] == 401
    status, _, body = request(port, "/tokenize", {"prompt": "word " * 5000})
    assert status == 400 and b"limit" in body
    # declared over the limit: refused from the headers (sending the body too would race the refusal)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: 1200000\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    sock.close()
    assert request(port, "/detokenize", {"tokens": [1, 2, 3]}, key="")[0] == 401


def test_health_shows_the_queue_and_hides_paths_without_the_key(one_slot):
    port, _ = one_slot
    anonymous, keyed = health(port, key="wrong"), health(port)
    assert "path" not in anonymous and "model_uri" not in anonymous
    assert "/" not in json.dumps({k: v for k, v in anonymous.items() if k != "model"})
    assert keyed["path"].endswith("model.gguf")
    for answer in (anonymous, keyed):
        assert answer["active"] == 0 and answer["queued"] == 0 and answer["parallel"] == 1
        assert answer["engine"] == "llama-server" and answer["status"] == "ok"


def test_metrics_are_prometheus_text(one_slot):
    port, _ = one_slot
    short_answer_seconds(port)
    requests = metric(port, "ftq_requests_total")
    assert requests[(("code", "200"), ("route", "/v1/chat/completions"))] >= 1
    assert sum(metric(port, "ftq_prompt_tokens_total").values()) > 0
    assert metric(port, "ftq_requests_running") == {(): 0.0} and metric(port, "ftq_requests_waiting") == {(): 0.0}
    latency = metric(port, "ftq_request_latency_seconds_count")
    assert sum(latency.values()) >= 1


def test_the_page_escapes_the_model_name(gguf_model, tmp_path):
    folder = tmp_path / "<img src=x onerror=alert(1)>"
    folder.mkdir()
    shutil.copy(gguf_model, folder / "model.gguf")
    process, port, answer = start_server(str(folder))
    try:
        assert answer["model"] == folder.name
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            page = response.read().decode()
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    finally:
        stop(process)


def rss(pid: int) -> int:
    """Resident memory of a process and its children (the engine), in bytes."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
