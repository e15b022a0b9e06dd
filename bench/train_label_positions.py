"""Logits at label positions only (ftq.data.collate.at_label_positions) against full logits, in training.

Both modes train the same LoRA (train block of params.yaml: rank, alpha, targets, learning rate) from
models/base on the same batches of data/processed/train (the first `--steps` x batch-size examples, in
group_by_length order as the train stage batches them), with the same seed, one process per run so that
each peak RSS is its own. Runs alternate (full, labels, full, labels, ...) `--repeats` times. Equal work
is asserted: the same real (non-padding) tokens and label tokens, and per-step losses equal to 1e-4
relative (the two modes differ only in summation order). Reported: median seconds per step, real tokens/s,
the median paired speed-up, the logits elements computed per step, and each run's peak RSS.

    env -u OMP_WAIT_POLICY .venv/bin/python bench/train_label_positions.py    # ~3 min on 2 CPU cores

Needs models/base and data/processed (`ftq run prepare`). Results: reports/bench/train_label_positions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "train_label_positions.json"


def one_run(mode: str, steps: int) -> dict:
    import torch
    from datasets import load_from_disk

    from ftq.data.collate import at_label_positions, padded
    from ftq.params import load_params
    from ftq.training.model import load_for_training
    from ftq.training.settings import TrainSettings

    settings = TrainSettings.from_params(load_params(ROOT / "params.yaml"))
    torch.manual_seed(settings.seed)
    model, tokenizer, _ = load_for_training(settings, ROOT / "models" / "base", {"bf16": False, "fp16": False},
                                            torch.device("cpu"))
    model.train()
    rows = load_from_disk(str(ROOT / "data" / "processed" / "train"))
    size = settings.per_device_batch_size
    picked = sorted(range(min(len(rows), (steps + 1) * size)), key=lambda i: -rows[i]["length"])  # like group_by_length
    batches = [padded([rows[i] for i in picked[s * size:(s + 1) * size]], tokenizer.pad_token_id)
               for s in range(steps + 1)]
    if mode == "labels":
        batches = [at_label_positions(b) for b in batches]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    losses, seconds, logits_elements = [], [], []
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        items = (batch["labels"] != -100).sum()
        out = model(**batch, num_items_in_batch=items)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if index:  # the first step warms up (allocations, kernels)
            seconds.append(time.perf_counter() - started)
        losses.append(out.loss.item())
        logits_elements.append(out.logits.numel())
    return {
        "mode": mode,
        "seconds_per_step": statistics.median(seconds),
        "real_tokens": int(sum(b["attention_mask"][:, :].sum() for b in batches[1:])),
        "label_tokens": int(sum((b["labels"] != -100).sum() for b in batches[1:])),
        "real_tokens_per_second": sum(b["attention_mask"].sum().item() for b in batches[1:]) / sum(seconds),
        "losses": losses,
        "logits_elements_per_step": statistics.median(logits_elements[1:]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", choices=["full", "labels"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.steps)))
        return
    runs: dict[str, list[dict]] = {"full": [], "labels": []}
    for repeat in range(args.repeats):
        for mode in ("full", "labels"):
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(args.steps)], cwd=ROOT,
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1} {mode}: {runs[mode][-1]['seconds_per_step']:.2f} s/step", flush=True)
    full, labels = runs["full"][0], runs["labels"][0]
    assert full["real_tokens"] == labels["real_tokens"] and full["label_tokens"] == labels["label_tokens"], "not equal work"
    for a, b in zip(runs["full"], runs["labels"]):
        for x, y in zip(a["losses"], b["losses"]):
            assert abs(x - y) <= 1e-4 * abs(x), f"losses differ: {a['losses']} vs {b['losses']}"
    ratios = [f["seconds_per_step"] / l["seconds_per_step"] for f, l in zip(runs["full"], runs["labels"])]

    def summary(mode: str) -> dict:
        rows = runs[mode]
        speeds = [r["real_tokens_per_second"] for r in rows]
        return {
            "seconds_per_step_median": round(statistics.median(r["seconds_per_step"] for r in rows), 3),
            "real_tokens_per_second_median": round(statistics.median(speeds), 1),
            "spread": round((max(speeds) - min(speeds)) / statistics.median(speeds), 3),
            # the process's high-water mark, model load included: glibc's allocator moves it by ~2 GB from run
            # to run in either mode, far more than the logits differ, so it is listed, not compared
            "peak_rss_bytes_runs": [r["peak_rss_bytes"] for r in rows],
            "seconds_per_step_runs": [round(r["seconds_per_step"], 3) for r in rows],
            "logits_elements_per_step": rows[0]["logits_elements_per_step"],
        }

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": full["threads"]},
        "steps": args.steps, "repeats": args.repeats,
        "equal_work": {"real_tokens": full["real_tokens"], "label_tokens": full["label_tokens"],
                       "losses_equal_to": "1e-4 relative"},
        "full_logits": summary("full"),
        "label_positions": summary("labels"),
        "speedup_median_paired": round(statistics.median(ratios), 3),
        "speedups": [round(r, 3) for r in ratios],
    }
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(OUT, stamp(report, script=__file__))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
