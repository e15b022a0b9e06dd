"""What LoRA dropout costs a CPU training step: the demo's own training (models/base, data/processed,
params.yaml's train block) for a few steps with train.lora.dropout 0.0 (the default, as in PEFT and
LLaMA-Factory) and 0.05 (ftq's earlier default, TRL's examples'), interleaved, each in a fresh process.

Dropout draws a Bernoulli mask over every LoRA layer's input on every step (torch's CPU bernoulli_
was a fifth of a step's profile here, its multiply another tenth); at 0.0 PEFT skips it (nn.Identity).
Both sides train the same steps on the same batches (same seed, same data order); the loss each
reaches is reported beside its time. Writes reports/bench/train_dropout.json.

    .venv/bin/python bench/train_dropout.py [--steps 8] [--repeats 3]   # ~5 min on 2 cores after `dvc repro prepare`
"""

from __future__ import annotations

import argparse
import os
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench" / "train_dropout.json"
DROPOUTS = (0.0, 0.05)

# one timed run, in a process of its own (no allocator or thread-pool state carried between runs)
WORKER = """
import json, sys, time, yaml
from pathlib import Path
from ftq.stages import train
from ftq.training.settings import TrainSettings
dropout, steps, checkpoints = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
params = yaml.safe_load(open("params.yaml"))
params["train"]["lora"]["dropout"] = dropout
params["train"].update(max_steps=steps, eval_steps=0, save_steps=10**6, checkpoint_dir=checkpoints)
settings = TrainSettings.from_params(params)
trainer, _, _, _, _ = train.build_trainer(settings, params, Path(".").resolve(), None)
trainer.eval_dataset = None
started = time.perf_counter()
outcome = trainer.train()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "steps": trainer.state.global_step, "loss": outcome.training_loss,
                  "tokens": trainer.state.num_input_tokens_seen,
                  "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"}))
"""


def timed(dropout: float, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-dropout-") as checkpoints:
        result = subprocess.run([sys.executable, "-c", WORKER, str(dropout), str(steps), checkpoints], cwd=ROOT,
                                capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"),
                                                                     "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"training with dropout {dropout} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not (ROOT / "data" / "processed").exists() or not (ROOT / "models" / "base").exists():
        raise SystemExit("run `dvc repro prepare` first: the bench trains on the demo's models/base and data/processed")
    runs: dict[float, list[dict]] = {d: [] for d in DROPOUTS}
    for repeat in range(args.repeats):
        for dropout in DROPOUTS:
            run = timed(dropout, args.steps)
            runs[dropout].append(run)
            print(f"repeat {repeat + 1}: dropout {dropout}: {run['seconds'] / run['steps']:.2f} s/step", file=sys.stderr)
    # equal work: the same steps over the same tokens on both sides
    tokens = {run["tokens"] for rs in runs.values() for run in rs}
    steps = {run["steps"] for rs in runs.values() for run in rs}
    assert len(tokens) == 1 and len(steps) == 1, (tokens, steps)
    results = {}
    for dropout, rs in runs.items():
        per_step = [r["seconds"] / r["steps"] for r in rs]
        mid = statistics.median(per_step)
        results[str(dropout)] = {"seconds_per_step": round(mid, 3), "seconds_per_step_runs": [round(s, 3) for s in per_step],
                                 "spread": round((max(per_step) - min(per_step)) / mid, 3),
                                 "loss": round(statistics.median(r["loss"] for r in rs), 4), "precision": rs[0]["precision"]}
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs[0.0], runs[0.05])]
    report = {
        "benchmark": "LoRA dropout's cost per training step (the demo's model, data and train block)",
        "command": "python bench/train_dropout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0))},
        "steps": steps.pop(), "tokens": tokens.pop(), "repeats": args.repeats,
        "results": results,
        # paired per repeat: dropout 0.05's time over dropout 0.0's, median
        "slowdown_with_dropout": round(statistics.median(ratios), 3),
        "slowdown_runs": [round(r, 3) for r in ratios],
    }
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    atomic_write_json(OUT, stamp(report, script=__file__))
    print(json.dumps(report["results"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
