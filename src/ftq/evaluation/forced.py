"""Teacher-forced scores of the held-out reference answers: no generation, one forward pass per example, so
a held-out set of thousands costs seconds to minutes where answering it costs an hour.

Per example (the task's held-out conversations, ftq.evaluation.task.load_examples), on the reference
answer's tokens after the chat template's generation prompt (the end-of-turn marker included):
  logprob   the mean log-probability per answer token the candidate gives the reference answer (higher is
            better; promote.policy.metric `forced_logprob`, direction max)
  kld       the mean KL(merged || candidate) over the same positions, merged's next-token distribution
            kept as its top `evaluate.forced_top_k` log-probabilities plus the rest as one bucket, as the
            quantize screen keeps it (ftq.quantize.distance; 0 for merged itself, whose rows come from
            its stored distribution; `forced_kld`, direction min)
  tokens    the answer's tokens

Every candidate scores the same token ids: merged's evaluation tokenizes the examples with merged's own
tokenizer and stores them with its distribution (`layout.HELDOUT_REFERENCE`, an output of stage
evaluate_merged); every other candidate reads them from there. Continuous per-example scores: the
policy tests them with a BCa bootstrap (ftq.evidence), and each carries more information than a 0/1 one,
so the same margin is decided on fewer examples.
"""

from __future__ import annotations

import numpy as np

from ftq.quantize import distance
from ftq.quantize.calibration import Sequences

# promote.policy.metric -> the per-example key of its rows, and the direction the metric must be read in
KEYS = {"forced_logprob": "logprob", "forced_kld": "kld"}
DIRECTIONS = {"forced_logprob": "max", "forced_kld": "min"}
SPLIT = "heldout task examples"


def token_ids(tokenizer, example: dict, max_length: int) -> tuple[list[int], list[bool]]:
    """An example's prompt (chat template, generation prompt) followed by its reference answer as the template
    closes an assistant turn; the answer's tokens are the scored ones. Longer than `max_length`: the prompt
    is cut from the left (the answer is what is scored)."""
    prompt = tokenizer.apply_chat_template(example["prompt"], tools=example.get("tools"), add_generation_prompt=True,
                                           tokenize=False)
    whole = tokenizer.apply_chat_template(example["prompt"] + [{"role": "assistant", "content": example["reference"]}],
                                          tools=example.get("tools"), tokenize=False)
    # the template's own end of turn where it renders the turn after the prompt unchanged; else the text alone
    answer = whole[len(prompt):].rstrip() if whole.startswith(prompt) else example["reference"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise ValueError(f"example {example['id']}: its reference answer is empty")
    if len(answer_ids) + 1 > max_length:
        raise ValueError(f"example {example['id']}: its reference answer has {len(answer_ids)} tokens, more than "
                         f"the {max_length} the context holds")
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]
    return prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids)


def reference(runtime, tokenizer, examples: list[dict], top_k: int, max_length: int) -> distance.Reference:
    """merged's distribution over each example's answer positions, with the token ids every candidate scores."""
    encoded = [token_ids(tokenizer, e, max_length) for e in examples]
    sequences = Sequences(SPLIT, [ids for ids, _ in encoded], [scored for _, scored in encoded])
    return distance.compute(runtime, sequences, top_k, {"example_ids": [e["id"] for e in examples],
                                                        "runtime": runtime.kind})


def check_examples(merged: distance.Reference, examples: list[dict], top_k: int, where) -> None:
    """merged's stored distribution must be of these examples at this top_k: one made for another held-out
    set or setting (outside DVC, which reruns evaluate_merged when either changes) is refused, never used."""
    stored = (merged.meta.get("example_ids"), merged.meta.get("top_k"))
    if stored != ([e["id"] for e in examples], top_k):
        raise ValueError(f"{where}: merged's held-out distribution is of {len(stored[0] or [])} other examples or "
                         f"another top_k ({stored[1]}, set {top_k}) than this run's {len(examples)}: rerun "
                         "`dvc repro evaluate_merged`")


def own_rows(merged: distance.Reference) -> list[dict]:
    """merged's rows from its stored distribution, without a second forward pass: its log-probabilities as
    stored, its divergence from itself 0 (a second pass gives the same up to float rounding: tested)."""
    out, start = [], 0
    for example_id, scored in zip(merged.meta["example_ids"], merged.sequences.targets):
        count = sum(scored[1:])
        target = merged.target_logprobs[start:start + count].astype(np.float64)
        out.append({"id": example_id, "tokens": count, "logprob": float(f"{target.mean():.6g}"), "kld": 0.0})
        start += count
    return out


def rows(runtime, merged: distance.Reference) -> list[dict]:
    """The candidate's per-example rows against merged's stored distribution."""
    ids = merged.meta["example_ids"]
    if len(ids) != len(merged.sequences.ids):
        raise ValueError(f"merged's held-out reference names {len(ids)} examples for {len(merged.sequences.ids)} "
                         "sequences: rerun `dvc repro evaluate_merged`")
    out, start = [], 0
    for index, (next_tokens, logprobs) in enumerate(distance.distributions(runtime, merged.sequences)):
        end = start + len(next_tokens)
        kld = distance.position_kld(merged.top_ids[start:end], merged.top_logprobs[start:end], logprobs)
        target = logprobs[np.arange(len(next_tokens)), next_tokens]
        # six significant digits: a good 8-bit build's divergence is a few millionths
        out.append({"id": ids[index], "tokens": len(next_tokens), "logprob": float(f"{target.mean():.6g}"),
                    "kld": float(f"{kld.mean():.6g}")})
        start = end
    if start != merged.positions or len(out) != len(ids):
        raise ValueError(f"the candidate scored {len(out)} examples ({start} positions); merged's held-out "
                         f"reference has {len(ids)} ({merged.positions}): rerun `dvc repro evaluate_merged`")
    return out


def aggregate(scored: list[dict]) -> dict:
    """forced_logprob and forced_kld: each mean with its 95 % interval (ftq.evidence) and its examples."""
    from ftq import evidence

    metrics: dict = {}
    for metric, key in KEYS.items():
        summary = evidence.mean_interval([r[key] for r in scored])
        metrics.update({metric: summary["mean"], f"{metric}_ci95": summary["interval"],
                        f"{metric}_examples": summary["examples"]})
    metrics["forced_tokens"] = sum(r["tokens"] for r in scored)
    return metrics
