"""How far a build's next-token distribution is from the merged model's, measured the way llama.cpp's
`perplexity --kl-divergence` measures a quant: the KL divergence KL(merged || build) at every scored
position (mean, median, 99th percentile, max) and how often both put the same token first (top-1
agreement).

The merged model's distribution is computed once per merged model (stage `reference`) and shared by
every build. It is kept as the top `top_k` log-probabilities of each position plus the rest of the
probability mass as one bucket (llama.cpp keeps whole logit rows, 49,152 floats per position here).
KL over that coarser partition is a lower bound of the full KL (merging outcomes never increases a KL
divergence); with top_k 256 the bucket holds a tiny share of the mass, and `kld_full_check` in
tests compares the two.

Positions are those that predict an answer token (labels != -100): what fine-tuning taught and what
serving samples, as the perplexity check scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftq.quantize.calibration import Sequences

ARRAYS = "logprobs.npz"
META = "reference.json"


@dataclass
class Reference:
    sequences: Sequences
    top_ids: np.ndarray  # [positions, k] int32, most probable first
    top_logprobs: np.ndarray  # [positions, k] float32
    target_logprobs: np.ndarray  # [positions] float32: log p(actual next token), for the perplexity
    meta: dict

    @property
    def positions(self) -> int:
        return int(self.top_ids.shape[0])

    @property
    def perplexity(self) -> float:
        return float(np.exp(-self.target_logprobs.astype(np.float64).mean()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def scored_rows(ids: list[int], scored: list[bool] | None) -> np.ndarray:
    """Rows of a sequence's logits that predict a scored token: row i predicts token i + 1."""
    keep = np.asarray(scored[1:] if scored is not None else [True] * (len(ids) - 1), dtype=bool)
    return np.nonzero(keep)[0]


def distributions(runtime, sequences: Sequences):
    """(rows, next tokens, log-probabilities [positions, vocab]) per sequence, on scored positions."""
    targets = sequences.targets or [None] * len(sequences.ids)
    for ids, scored in zip(sequences.ids, targets):
        rows = scored_rows(ids, scored)
        if len(rows):
            logprobs = log_softmax(np.asarray(runtime.logits(ids))[rows])
            yield np.asarray(ids)[rows + 1], logprobs


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest entries' indices, largest first, ties by lower index: exactly
    `np.argsort(-values, kind="stable")[:, :k]`, without sorting whole vocabulary rows (a large share of the
    reference stage's time at 49,152 entries a row)."""
    k = min(k, values.shape[-1])
    part = np.argpartition(-values, k - 1, axis=-1)[:, :k]
    kth = np.take_along_axis(values, part, axis=-1).min(axis=1)
    rows = []
    for row, bound in zip(values, kth):
        above = np.flatnonzero(row > bound)
        chosen = np.concatenate([above, np.flatnonzero(row == bound)[:k - len(above)]])
        rows.append(chosen[np.lexsort((chosen, -row[chosen]))])
    return np.stack(rows) if rows else np.empty((0, k), dtype=np.int64)


def compute(runtime, sequences: Sequences, top_k: int, meta: dict) -> Reference:
    ids_parts, lp_parts, target_parts = [], [], []
    for next_tokens, logprobs in distributions(runtime, sequences):
        top = top_k_indices(logprobs, top_k)
        ids_parts.append(top.astype(np.int32))
        lp_parts.append(np.take_along_axis(logprobs, top, axis=-1).astype(np.float32))
        target_parts.append(logprobs[np.arange(len(next_tokens)), next_tokens].astype(np.float32))
    if not ids_parts:
        raise ValueError("the reference sample has no scored (answer) tokens")
    top_ids, top_lp = np.concatenate(ids_parts), np.concatenate(lp_parts)
    tail = 1.0 - np.exp(top_lp.astype(np.float64)).sum(axis=1)
    meta = {**meta, "top_k": top_k, "positions": int(top_ids.shape[0]), "sequences": sequences.describe(),
            "tail_mass_mean": float(tail.mean()), "tail_mass_max": float(tail.max())}
    return Reference(sequences, top_ids, top_lp, np.concatenate(target_parts), meta)


def save(reference: Reference, folder: Path) -> None:
    np.savez_compressed(folder / ARRAYS, top_ids=reference.top_ids, top_logprobs=reference.top_logprobs,
                        target_logprobs=reference.target_logprobs)
    (folder / "sequences.json").write_text(json.dumps({"split": reference.sequences.split,
                                                       "ids": reference.sequences.ids,
                                                       "targets": reference.sequences.targets}))
    meta = {**reference.meta, "perplexity": reference.perplexity, "sha256": arrays_sha256(folder / ARRAYS)}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def arrays_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(folder: Path) -> Reference:
    if not (folder / META).exists():
        raise FileNotFoundError(f"{folder}: no reference distribution; run `dvc repro reference` first")
    meta = json.loads((folder / META).read_text())
    if arrays_sha256(folder / ARRAYS) != meta["sha256"]:
        raise ValueError(f"{folder / ARRAYS}: contents do not match {META} (sha256); rerun `dvc repro reference`")
    arrays = np.load(folder / ARRAYS)
    stored = json.loads((folder / "sequences.json").read_text())
    sequences = Sequences(stored["split"], stored["ids"], stored["targets"])
    return Reference(sequences, arrays["top_ids"], arrays["top_logprobs"], arrays["target_logprobs"], meta)


def position_kld(ref_ids: np.ndarray, ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(merged || build) at each position over merged's top-k + rest partition: `ref_ids` / `ref_logprobs`
    merged's top-k per position, `logprobs` the build's whole log-softmax rows ([positions, vocab])."""
    ref_lp = ref_logprobs.astype(np.float64)
    build_lp = np.take_along_axis(logprobs, ref_ids.astype(np.int64), axis=-1)
    ref_tail = np.clip(1.0 - np.exp(ref_lp).sum(axis=1), 0.0, 1.0)
    build_tail = np.clip(1.0 - np.exp(build_lp).sum(axis=1), 1e-12, 1.0)
    head = (np.exp(ref_lp) * (ref_lp - build_lp)).sum(axis=1)
    rest = np.where(ref_tail > 0, ref_tail * (np.log(np.maximum(ref_tail, 1e-300)) - np.log(build_tail)), 0.0)
    return np.maximum(head + rest, 0.0)


def divergence(runtime, reference: Reference) -> dict:
    """KL(merged || build) per scored position over the reference's top-k + rest partition, its summary,
    top-1 agreement, and the build's perplexity on the same answer tokens."""
    klds, same, target_lp = [], [], []
    start = 0
    for next_tokens, logprobs in distributions(runtime, reference.sequences):
        end = start + len(next_tokens)
        ref_ids = reference.top_ids[start:end]
        klds.append(position_kld(ref_ids, reference.top_logprobs[start:end], logprobs))
        same.append(logprobs.argmax(axis=1) == ref_ids[:, 0])
        target_lp.append(logprobs[np.arange(len(next_tokens)), next_tokens])
        start = end
    if start != reference.positions:
        raise ValueError(f"the build scored {start} positions, the reference has {reference.positions}")
    kld = np.concatenate(klds)
    build_ppl = float(np.exp(-np.concatenate(target_lp).mean()))
    return {"kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
            "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()),
            "top1_agreement": float(np.concatenate(same).mean()), "positions": int(start),
            "perplexity": build_ppl, "merged_perplexity": reference.perplexity,
            "perplexity_ratio": build_ppl / reference.perplexity}
