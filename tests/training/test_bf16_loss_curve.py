"""`train.precision: auto` trains in bf16 (autocast) on a CPU with bf16 matrix instructions: the loss curve
must come down as fp32's does on the same batches, step by step, within a stated tolerance."""

import csv
import json

from conftest import load_params, set_params
from ftq.stages import base, prepare, train

STEPS = 12
SETTINGS = {"max_steps": STEPS, "per_device_batch_size": 4, "learning_rate": 5e-3, "eval_steps": 0,
            "save_steps": STEPS, "logging_steps": 1, "warmup": 0}
# bf16 keeps 8 bits of mantissa. The tiny model starts near a uniform distribution, so its losses agree
# closely whatever the precision: what is compared is how far each run has come down from its first loss,
# step by step. A bf16 run that learns what fp32 learns stays within 5 % of fp32's total progress (measured
# here: about 0.1 %); one whose LoRA updates round away or whose gradients are lost makes next to none.
PROGRESS_TOLERANCE = 0.05


def losses(root, precision: str) -> tuple[list[float], str]:
    set_params(root, train={**SETTINGS, "precision": precision})
    train.run(load_params(root))
    with open(root / "reports" / "train_loss.csv") as rows:
        curve = [float(row["loss"]) for row in csv.DictReader(rows)]
    return curve, json.loads((root / "reports" / "train.json").read_text())["precision"]


def test_the_bf16_loss_curve_follows_fp32s_progress_within_five_percent(project):
    params = load_params(project)
    base.run(params)
    prepare.run(params)
    fp32, ran_fp32 = losses(project, "fp32")
    bf16, ran_bf16 = losses(project, "bf16")
    assert (ran_fp32, ran_bf16) == ("fp32", "bf16")
    assert len(fp32) == len(bf16) == STEPS
    assert bf16 != fp32  # each ran in its own precision
    progress_fp32 = [fp32[0] - loss for loss in fp32]
    progress_bf16 = [bf16[0] - loss for loss in bf16]
    assert progress_fp32[-1] > 0.2  # fp32 learns: a yardstick to hold bf16 to
    apart = [abs(b - f) / progress_fp32[-1] for b, f in zip(progress_bf16, progress_fp32)]
    assert max(apart) <= PROGRESS_TOLERANCE, [round(a, 4) for a in apart]
