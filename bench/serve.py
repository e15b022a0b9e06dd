"""Serving benchmark: `ftq serve` next to llama.cpp's own `llama-server`, both serving the same GGUF with
the same threads and slots, driven by the same streaming client in the same run.

Each level (default 1, 8 and 32 concurrent clients) sends at least `--requests` requests (default 24;
each client sends ceil(requests / clients) one after another, so 1 client sends 24 and 32 clients one each), all chat
completions streamed over SSE with `ignore_eos` and `max_tokens` 128, so every answer is exactly 128
tokens. Both servers get the same request type (/v1/chat/completions) with the same sampler: greedy,
which llama-server runs at its best with top_k 1 and min_p 0 (what ftq's engine sends it; ftq's OpenAI
API has no such fields). llama-server's raw /completion, the path ftq's engine itself takes, is measured
beside them. Every side's own counts (prompt and completion tokens) and greedy text are asserted equal
per prompt before anything is reported. One server is up at a time, ftq and llama-server in alternating order, and the whole
comparison repeats `--repeats` times (default 5). The table gives the median of the repeats; each goal ratio
is taken within each repeat (ftq against the llama-server measured beside it) and the median of those
paired ratios is what the goals are judged on, since this 2-core VM's speed drifts by 10-15 % over minutes.

Reported per level and server: aggregate tokens/s (completion tokens / wall time), each request's decode
tokens/s ((tokens - 1) / time from first to last token, median), latency p50/p95 (request sent to last
token), time to first token p50. Goals (issue 12): one client's decode within 5 % of llama-server; 8 clients'
aggregate >= 2.2x one client's and within 5 % of llama-server's; p50 latency at 8 clients <= 4x one client's.

    .venv/bin/python bench/serve.py                          # models:/<promote.model_name>@champion
    .venv/bin/python bench/serve.py --model models/quantized/q4_0/model.gguf --repeats 5

An HF folder (transformers engine) is measured alone (`--model models/merged --out ...`).

Writes reports/bench/serve.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "serve.json"
PROMPTS = ["Who are you?", "Write one sentence about the sea.", "What is 12 times 7?",
           "Extract the order as JSON with the keys customer, item, quantity and city. Reply with the JSON object only."
           "\nSend 4 lamps to Oslo for Maria."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# llama-server's greedy at its best: top_k 1 finds the argmax in one pass and min_p 0 drops a filter that
# cannot change it; ftq's engine sends exactly these for temperature 0 (ftq.engines.llama_server), and
# ftq's own API (OpenAI's) has no such fields, so they go to llama-server alone
PEER_GREEDY = {"top_k": 1, "min_p": 0.0}


async def one_request(client, url: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    """One streamed chat completion (both sides: the same endpoint type, greedy, ignore_eos)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra}
    sent = time.perf_counter()
    first = last = None
    usage, text = None, ""
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    text += choice["delta"]["content"]
    if usage is None or first is None:
        raise RuntimeError(f"{url}: no usage or no text in the stream")
    return {"prompt": prompt, "text": text, "latency": last - sent, "ttft": first - sent, "decode_seconds": last - first,
            "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}


async def one_completion(client, url: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    """What ftq's engine sends llama-server for the same chat: the prompt rendered by llama-server's own
    /apply-template, then /completion streamed with the same sampler (ftq's internal path, measured raw)."""
    base = url.rsplit("/", 1)[0]
    rendered = (await client.post(f"{base}/apply-template",
                                  json={"messages": [{"role": "user", "content": prompt}]})).json()["prompt"]
    body = {"prompt": rendered, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "cache_prompt": True, **extra}
    sent = time.perf_counter()
    first = last = None
    text, counts = "", {}
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("content"):
                last = time.perf_counter()
                first = first or last
                text += chunk["content"]
            if chunk.get("stop"):
                counts = chunk
    if first is None or not counts:
        raise RuntimeError(f"{url}: no text or no final chunk in the stream")
    return {"prompt": prompt, "text": text, "latency": last - sent, "ttft": first - sent, "decode_seconds": last - first,
            "prompt_tokens": counts["tokens_evaluated"], "completion_tokens": counts["tokens_predicted"]}


async def level(side: "Side", url: str, clients: int, rounds: int, max_tokens: int) -> tuple[dict, list[dict]]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients + 8, max_keepalive_connections=0)) as client:
        async def worker(index: int) -> list[dict]:
            return [await side.request(client, url, PROMPTS[(index + r) % len(PROMPTS)], max_tokens, side.extra)
                    for r in range(rounds)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    tokens = sum(r["completion_tokens"] for r in results)
    decode = [(r["completion_tokens"] - 1) / r["decode_seconds"] for r in results if r["decode_seconds"] > 0]
    summary = {"requests": len(results), "completion_tokens": tokens, "wall_seconds": round(wall, 3),
               "tokens_per_second": round(tokens / wall, 2),
               "decode_tokens_per_second_p50": round(statistics.median(decode), 2),
               "latency_p50": round(percentile([r["latency"] for r in results], 0.5), 3),
               "latency_p95": round(percentile([r["latency"] for r in results], 0.95), 3),
               "ttft_p50": round(percentile([r["ttft"] for r in results], 0.5), 3)}
    return summary, results


def start(command: list[str], health: str, log_dir: str, name: str) -> tuple[subprocess.Popen, dict]:
    """A server in its own process group, once its /health answers 200 (ftq.processes.wait_http)."""
    import urllib.request

    from ftq.processes import wait_http

    log = os.path.join(log_dir, f"{name}.log")
    process = subprocess.Popen(command, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    wait_http(health, process, 300, log)
    with urllib.request.urlopen(health, timeout=10) as response:
        return process, json.loads(response.read())


@dataclass(frozen=True)
class Side:
    server: str  # which server process: ftq or llama-server
    endpoint: str
    request: Callable
    extra: dict


SIDES = {"ftq": Side("ftq", "/v1/chat/completions", one_request, {}),
         "llama-server": Side("llama-server", "/v1/chat/completions", one_request, PEER_GREEDY),
         "llama-server /completion": Side("llama-server", "/completion", one_completion, PEER_GREEDY)}


def median_of(runs: list[dict]) -> dict:
    return {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: models:/<promote.model_name>@champion")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=24, help="at least this many requests per level")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--parallel", type=int, default=8, help="slots on both servers (-np)")
    parser.add_argument("--ctx-size", type=int, default=1024, help="tokens per slot on both servers")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ftq.engines.llama_server import binary
    from ftq.params import load_params
    from ftq.processes import free_port, stop_group
    from ftq.registry.resolve import resolve
    from ftq.runtimes import artifact_format, gguf_file

    os.chdir(ROOT)
    params = load_params(ROOT / "params.yaml")
    reference = args.model or f"models:/{params['promote']['model_name']}@champion"
    levels = [int(x) for x in args.levels.split(",")]
    log_dir = tempfile.mkdtemp(prefix="ftq-bench-serve-")
    path = resolve(reference, params).path
    is_gguf = artifact_format(path) == "gguf"  # llama-server serves GGUF only: HF builds are measured alone

    def ftq_command(port: int) -> list[str]:
        return [sys.executable, "-m", "ftq", "serve", "--model", reference, "--port", str(port), "--threads",
                str(args.threads), "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size),
                "--max-queued", "256"]

    def peer_command(port: int) -> list[str]:  # the same binary, file, threads, slots and context as ftq's engine
        return [str(binary()), "--model", str(gguf_file(path)), "--host", "127.0.0.1", "--port", str(port), "--threads",
                str(args.threads), "--threads-batch", str(args.threads), "--parallel", str(args.parallel),
                "--ctx-size", str(args.ctx_size * args.parallel), "--cont-batching", "--threads-http",
                str(args.parallel + 4), "--no-webui", "--jinja"]

    servers = {"ftq": ftq_command, "llama-server": peer_command} if is_gguf else {"ftq": ftq_command}
    sides = {name: side for name, side in SIDES.items() if side.server in servers}
    runs: dict[str, dict[str, list]] = {name: {str(n): [] for n in levels} for name in sides}
    results: dict[str, dict[int, list]] = {name: {} for name in sides}
    health = {}
    for repeat in range(args.repeats):
        # one server up at a time (llama.cpp's OpenMP threads of an idle second server still cost the
        # other one), in alternating order
        for server in (list(servers) if repeat % 2 == 0 else list(reversed(servers))):
            port = free_port()
            process, answer = start(servers[server](port), f"http://127.0.0.1:{port}/health", log_dir, server)
            health = answer if server == "ftq" else health
            try:
                for name, side in sides.items():
                    if side.server != server:
                        continue
                    url = f"http://127.0.0.1:{port}{side.endpoint}"
                    asyncio.run(level(side, url, 2, 1, 8))  # warm-up
                    for clients in levels:
                        rounds = -(-args.requests // clients)
                        summary, results[name][clients] = asyncio.run(level(side, url, clients, rounds, args.max_tokens))
                        runs[name][str(clients)].append(summary)
                        print(f"repeat {repeat + 1} {name:24s} x{clients:<3d} {summary}", flush=True)
            finally:
                stop_group(process)
        for clients in levels:
            equal_work({name: results[name][clients] for name in sides}, args.max_tokens)
    table = {name: {n: median_of(rows) for n, rows in by_level.items()} for name, by_level in runs.items()}
    report = {"model": reference, "version": health.get("version"), "sha256": health.get("sha256"),
              "max_tokens": args.max_tokens, "ignore_eos": True, "threads": args.threads,
              "parallel": args.parallel, "ctx_size_per_slot": args.ctx_size, "min_requests_per_level": args.requests,
              "repeats": args.repeats, "median_of_repeats": table, "goals": goals(runs, table, levels),
              "runs": runs, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "peer_sampler": PEER_GREEDY,
              "method": "one server up at a time, alternating order per repeat, the same asyncio+httpx streaming client; "
                        "chat completions on both (llama-server with top_k 1 and min_p 0, ftq's engine's greedy), "
                        "ignore_eos; token counts and greedy text asserted equal per prompt; llama-server's "
                        "/completion (ftq's internal path) measured beside them"}
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(args.out, stamp(report, script=__file__))
    print(json.dumps({k: v for k, v in report["goals"].items() if k != "per_repeat"}, indent=2))
    print(f"wrote {args.out}")


def equal_work(results: dict[str, list[dict]], max_tokens: int) -> None:
    """Every side saw the same prompts (the same prompt tokens, by each side's own count), produced exactly
    max_tokens each, and, greedy on the same file, the same text for the same prompt."""
    sides = list(results.values())
    for rows in sides:
        assert all(r["completion_tokens"] == max_tokens for r in rows), [r["completion_tokens"] for r in rows]
    prompts = [sorted(r["prompt_tokens"] for r in rows) for rows in sides]
    assert all(p == prompts[0] for p in prompts), prompts
    texts = [{r["prompt"]: r["text"] for r in rows} for rows in sides]
    for name, seen in zip(results, texts):
        assert seen == texts[0], f"{name}: greedy text differs from {next(iter(results))}'s"


TARGETS = {"one_client_decode_vs_llama_server": ">= 0.95", "eight_clients_aggregate_vs_one": ">= 2.2",
           "eight_clients_aggregate_vs_llama_server": ">= 0.95", "eight_clients_p50_latency_vs_one": "<= 4"}


def ratios(ftq: dict, peer: dict | None) -> dict:
    """The goal ratios from one repeat's rows (`ftq[level]`, `peer[level]`), or from the median table."""
    one, eight = ftq["1"], ftq["8"]
    found = {"eight_clients_aggregate_vs_one": eight["tokens_per_second"] / one["tokens_per_second"],
             "eight_clients_p50_latency_vs_one": eight["latency_p50"] / one["latency_p50"]}
    if peer is not None:
        found.update(
            one_client_decode_vs_llama_server=(one["decode_tokens_per_second_p50"]
                                               / peer["1"]["decode_tokens_per_second_p50"]),
            one_client_tokens_per_second_vs_llama_server=one["tokens_per_second"] / peer["1"]["tokens_per_second"],
            eight_clients_aggregate_vs_llama_server=eight["tokens_per_second"] / peer["8"]["tokens_per_second"])
    return {key: round(value, 3) for key, value in sorted(found.items())}


def goals(runs: dict, table: dict, levels: list[int]) -> dict:
    """Each ratio per repeat (ftq and llama-server measured minutes apart, so a machine that slows down for
    a while slows both sides of a pair), then their median: the paired measure the goals are judged on.
    The ratio of the medians is given beside it."""
    if 1 not in levels or 8 not in levels:
        return {}
    repeats = len(runs["ftq"]["1"])
    per_repeat = [ratios({n: rows[i] for n, rows in runs["ftq"].items()},
                         {n: rows[i] for n, rows in runs["llama-server"].items()} if "llama-server" in runs else None)
                  for i in range(repeats)]
    paired = {key: round(statistics.median(r[key] for r in per_repeat), 3) for key in per_repeat[0]}
    return {"median_of_paired_ratios": paired, "per_repeat": per_repeat,
            "ratio_of_medians": ratios(table["ftq"], table.get("llama-server")),
            "targets": {k: v for k, v in TARGETS.items() if k in paired}}


if __name__ == "__main__":
    main()
