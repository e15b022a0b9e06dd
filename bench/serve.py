"""Serving benchmark: tokens/s and p50/p95 request latency at 1, 8 and 32 concurrent streaming clients
through `ftq serve` (the official openai client over HTTP/SSE), next to the same GGUF driven directly
by llama.cpp (llama-cpp-python in this process) in the same run. The server generates one request at
a time (one model), so the direct baseline runs the same requests back to back and each request's
latency is its wait plus its own generation: the difference is the server's overhead.

    .venv/bin/python bench/serve.py                          # models:/<promote.model_name>@champion
    .venv/bin/python bench/serve.py --model models/quantized/q4_0/model.gguf

Writes reports/bench/serve.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "serve.json"
PROMPTS = ["Who are you?", "Write one sentence about the sea.", "What is 12 times 7?",
           "Extract the order as JSON with the keys customer, item, quantity and city. Reply with the JSON object only."
           "\nSend 4 lamps to Oslo for Maria."]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    return {"requests": len(latencies), "tokens": tokens, "wall_seconds": round(wall, 3),
            "tokens_per_second": round(tokens / wall, 2), "latency_p50": round(percentile(latencies, 0.5), 3),
            "latency_p95": round(percentile(latencies, 0.95), 3), "latency_mean": round(statistics.mean(latencies), 3)}


def start_server(model: str, threads: int) -> tuple[subprocess.Popen, int, dict]:
    from ftq.processes import free_port  # after main() put src/ on sys.path

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ftq", "serve", "--model", model, "--port", str(port),
                                "--threads", str(threads)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return process, port, json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    process.kill()
    sys.exit("ftq serve did not start")


def through_server(port: int, model: str, concurrency: int, max_tokens: int) -> dict:
    from openai import OpenAI

    api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                             max_tokens=max_tokens, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
        usage = [c.usage for c in stream if c.usage][-1]
        return time.perf_counter() - started, usage.completion_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(concurrency)))
    wall = time.perf_counter() - started
    return summary([r[0] for r in results], sum(r[1] for r in results), wall)


def direct(llm, concurrency: int, max_tokens: int) -> dict:
    latencies, tokens, clock = [], 0, 0.0
    started = time.perf_counter()
    for i in range(concurrency):
        t0 = time.perf_counter()
        out = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                         max_tokens=max_tokens, temperature=0, seed=0)
        clock += time.perf_counter() - t0
        latencies.append(clock)  # all requests arrive at once and are served back to back
        tokens += out["usage"]["completion_tokens"]
    return summary(latencies, tokens, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: models:/<promote.model_name>@champion")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ftq.params import load_params
    from ftq.registry.resolve import resolve
    from ftq.runtimes import artifact_format, gguf_file

    os.chdir(ROOT)
    params = load_params(ROOT / "params.yaml")
    reference = args.model or f"models:/{params['promote']['model_name']}@champion"
    resolved = resolve(reference, params)
    if artifact_format(resolved.path) != "gguf":
        sys.exit(f"{reference} is not a GGUF build; the direct baseline needs llama.cpp")
    from llama_cpp import Llama

    levels = [int(x) for x in args.levels.split(",")]
    rows = {}
    process, port, health = start_server(reference, args.threads)
    try:
        through_server(port, health["model"], 1, 4)  # warm-up
        for level in levels:
            rows.setdefault(str(level), {})["server"] = through_server(port, health["model"], level, args.max_tokens)
            print(f"server  x{level}: {rows[str(level)]['server']}", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    llm = Llama(model_path=str(gguf_file(resolved.path)), n_ctx=4096, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    direct(llm, 1, 4)  # warm-up
    for level in levels:
        row = rows[str(level)]
        row["llama_cpp_direct"] = direct(llm, level, args.max_tokens)
        server, base = row["server"], row["llama_cpp_direct"]
        row["overhead_percent"] = {
            "tokens_per_second": round(100 * (base["tokens_per_second"] - server["tokens_per_second"]) / base["tokens_per_second"], 2),
            "latency_p50": round(100 * (server["latency_p50"] - base["latency_p50"]) / base["latency_p50"], 2),
            "latency_p95": round(100 * (server["latency_p95"] - base["latency_p95"]) / base["latency_p95"], 2),
        }
        print(f"direct  x{level}: {base}\noverhead x{level}: {row['overhead_percent']}", flush=True)
    report = {"model": reference, "version": resolved.version, "path": str(resolved.path), "max_tokens": args.max_tokens,
              "threads": args.threads, "levels": rows, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "method": "server: ftq serve + openai client, streaming, all clients at once; direct: llama-cpp-python "
                        "create_chat_completion back to back, latency = wait + own generation"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
