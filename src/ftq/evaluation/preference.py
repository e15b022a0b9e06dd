"""Held-out preference pairs scored from summed answer log-probabilities (pure: no model here).

For each pair, logp(chosen | prompt) and logp(rejected | prompt) under the tuned model and under the
model preference tuning started from (the reference, DPO's pi_ref). Per pair:
- reward margin: beta * ((tuned_c - ref_c) - (tuned_r - ref_r)), DPO's implicit reward of the chosen
  answer minus the rejected one's (TRL's rewards/margins);
- pref_accuracy: 1 where the margin ranks chosen higher, 0 where lower, 1/2 on a tie (the reference
  against itself ties on every pair: 0.5, a coin's score, is the baseline a tuned model must beat);
- logp_accuracy: 1 where the model itself gives the chosen answer the higher log-probability (0 or 1/2
  likewise): comparable between the reference and the tuned model, pair by pair.
Means carry seeded bootstrap intervals; tuned against reference is a paired difference."""

from __future__ import annotations

from ftq import evidence


def ranked(margin: float) -> float:
    return 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5


def pair_rows(ids: list[str], reference: list[tuple[float, float]], tuned: list[tuple[float, float]],
              beta: float) -> list[dict]:
    """Per-pair scores; reference and tuned are (logp chosen, logp rejected) in the order of ids."""
    if not (len(ids) == len(reference) == len(tuned)):
        raise ValueError(f"{len(ids)} pairs, {len(reference)} reference and {len(tuned)} tuned log-probabilities")
    rows = []
    for pair_id, (ref_c, ref_r), (new_c, new_r) in zip(ids, reference, tuned):
        margin = beta * ((new_c - ref_c) - (new_r - ref_r))
        rows.append({"id": pair_id, "logp_chosen": round(new_c, 4), "logp_rejected": round(new_r, 4),
                     "ref_logp_chosen": round(ref_c, 4), "ref_logp_rejected": round(ref_r, 4),
                     "reward_margin": round(margin, 6), "pref_accuracy": ranked(margin),
                     "logp_accuracy": ranked(new_c - new_r), "ref_logp_accuracy": ranked(ref_c - ref_r)})
    return rows


def candidate_logps(runtime, pair: dict) -> tuple[float, float]:
    """A candidate's summed log-probabilities of a pair's chosen and rejected answer after its prompt, from
    the runtime's own scoring (transformers or llama.cpp: Runtime.sequence_nll over the answer tokens)."""
    prompt = list(pair["prompt_ids"])
    sums = []
    for side in ("chosen_ids", "rejected_ids"):
        answer = list(pair[side])
        nll, _ = runtime.sequence_nll(prompt + answer, [False] * len(prompt) + [True] * len(answer))
        sums.append(-nll)
    return sums[0], sums[1]


def candidate_rows(runtime, pairs: list[dict], beta: float) -> list[dict]:
    """Per-pair scores of a candidate against the starting model's log-probs stored with the pairs."""
    reference = [(p["logp_chosen"], p["logp_rejected"]) for p in pairs]
    return pair_rows([p["id"] for p in pairs], reference, [candidate_logps(runtime, p) for p in pairs], beta)


def flat(summary: dict) -> dict[str, float]:
    """The summary's numbers as flat report keys: pref_accuracy, pref_reward_margin, pref_logp_accuracy,
    each with its 95 % interval."""
    values = {}
    for key, name in (("pref_accuracy", "pref_accuracy"), ("reward_margin", "pref_reward_margin"),
                      ("logp_accuracy", "pref_logp_accuracy")):
        values[name] = summary[key]["mean"]
        values[f"{name}_ci95"] = summary[key]["interval"]  # as task metrics carry theirs
    return values


def summary(rows: list[dict], seed: int = 0) -> dict:
    """pref_accuracy and reward_margin with 95 % intervals; logp_accuracy of both models and the paired
    difference, tuned minus reference."""
    if not rows:
        raise ValueError("no preference pairs to score")
    column = {key: [r[key] for r in rows] for key in ("pref_accuracy", "reward_margin", "logp_accuracy",
                                                       "ref_logp_accuracy")}
    return {
        "pairs": len(rows),
        "pref_accuracy": evidence.mean_interval(column["pref_accuracy"], seed=seed),
        "reward_margin": evidence.mean_interval(column["reward_margin"], seed=seed),
        "logp_accuracy": evidence.mean_interval(column["logp_accuracy"], seed=seed),
        "reference_logp_accuracy": evidence.mean_interval(column["ref_logp_accuracy"], seed=seed),
        "logp_accuracy_vs_reference": evidence.difference(column["logp_accuracy"], column["ref_logp_accuracy"],
                                                          seed=seed),
        # against the coin's 0.5 that the reference scores on every pair: a one-sample paired difference
        "pref_accuracy_vs_reference": evidence.difference(column["pref_accuracy"], [0.5] * len(rows), seed=seed),
    }


def held_out_reference(params: dict, root: Path) -> tuple[list[dict], float] | None:
    """The held-out pairs as stage preference tokenized and scored them with the starting model
    (reference_logps.jsonl: ids, token ids, log-probs) and the beta they were tuned with; None where no
    preference tuning made the output. Evaluate scores every candidate on exactly these ids."""
    import json

    from ftq import layout, schema

    folder = root / schema.settings(params, "preference")["output_dir"]
    info_file = folder / layout.PREFERENCE_INFO
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if info.get("settings", {}).get("objective", "none") == "none":
        return None
    rows = [json.loads(line) for line in (folder / layout.PREFERENCE_REFERENCE_LOGPS).read_text().splitlines()
            if line.strip()]
    return rows, float(info["settings"]["beta"])
