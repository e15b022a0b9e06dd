"""Stage `reference`: the merged model's next-token distribution on a seeded sample of held-out
examples, computed once per merged model and read by every quantize@<build> stage's check
(ftq.quantize.distance). Outputs:
  models/reference/    logprobs.npz (top-k log-probabilities per answer position, and the answer
                       token's own), sequences.json (the sample's token ids), reference.json
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftq.io import atomic_dir
from ftq import schema
from ftq.params import repo_root
from ftq.stages import MERGED_DIR, merged_model

log = logging.getLogger(__name__)

OUTPUT_DIR = Path("models/reference")
@dataclass
class ReferenceSettings:
    split: str
    examples: int
    max_length: int
    seed: int
    top_k: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ReferenceSettings":
        return cls(**schema.settings(params, "quantize")["reference"])


def run(params: dict[str, Any]) -> dict[str, Any]:
    from ftq.quantize import distance
    from ftq.quantize.calibration import sample
    from ftq.runtimes import open_model
    from ftq.tracking import stage_run

    settings = ReferenceSettings.from_params(params)
    root = repo_root()
    merged = merged_model(root)
    # seeded, not the first rows: held-out files are often grouped by kind
    sequences = sample(root, settings.split, settings.examples, settings.max_length, seed=settings.seed)
    with stage_run("reference", params, block_name="quantize", block_values={"reference": vars(settings)}) as tracked:
        started = time.time()
        runtime = open_model(merged)
        try:
            reference = distance.compute(runtime, sequences, settings.top_k,
                                         {"model": MERGED_DIR.as_posix(), "runtime": runtime.kind, **vars(settings)})
            # the merged model's own answer to the check prompt: a build's incoherent answer fails the check
            # unless merged's is incoherent too
            check = schema.settings(params, "quantize")["check"]
            reference.meta.update(prompt=check["prompt"], max_new_tokens=check["max_new_tokens"],
                                  reply=runtime.chat([{"role": "user", "content": check["prompt"]}],
                                                     max_new_tokens=check["max_new_tokens"]))
        finally:
            runtime.close()
        reference.meta["seconds"] = round(time.time() - started, 2)
        with atomic_dir(root / OUTPUT_DIR) as tmp:
            distance.save(reference, tmp)
        tracked.log_metrics({"positions": reference.positions, "perplexity": reference.perplexity,
                             "tail_mass_mean": reference.meta["tail_mass_mean"],
                             "seconds": reference.meta["seconds"]})
        tracked.log_artifact(root / OUTPUT_DIR / distance.META)
    log.info("reference: merged's distribution at %d answer positions of %d held-out examples (top %d), "
             "perplexity %.3f, %.1f s", reference.positions, len(sequences.ids), settings.top_k,
             reference.perplexity, reference.meta["seconds"])
    return {**reference.meta, "perplexity": reference.perplexity}
