"""The default preference pairs (`ftq data make-default` writes data/raw/ftq_default/preference.json and
preference_heldout.json, LLaMA-Factory's Alpaca ranking layout): the right order extraction as `chosen`
against one of the mistakes the SFT model is measured to make on the held-out orders as `rejected`.

Measured on the demo's merged model (reports/eval/merged.answers.jsonl, 40 held-out orders): a name,
item or city copied with letters lost or changed ("Caspian" -> "Caspin", "Graz" -> "Gazza"), another
item in the item's place ("skillet" -> "kettle"), and the city put where the customer belongs
(`{"customer": "Montevideo", ..., "city": "Montevideo"}`), another city in the city's place ("Busan" ->
"Barcelona"). All of them happen on words the SFT model never saw; on the training words it copies right.
So the training pairs' orders use names, items and cities of their own (PAIR_*: neither in the SFT data
nor in the held-out set), where the SFT model meets unseen words as it does on the held-out orders, in the
training sentence shapes; the held-out pairs use the held-out words and shapes, so `pref_accuracy` and the
task metric are measured on orders no pair was trained on. Each rejected answer is one of these mistakes,
chosen in turn.

The training pairs are on-policy where the SFT model errs: `ftq data make-default --pairs-from
models/merged` has the demo's merged SFT model answer every training order (greedy, as evaluate answers),
and where its answer is not the right extraction, that answer is the rejected one: DPO then pushes down
what the model actually says, not only a mistake of the same kind. Where it answers right, the rejected
answer is the synthetic mistake. Without a model (the default) every rejected answer is synthetic."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ftq.data import default_set

log = logging.getLogger(__name__)
ANSWER_TOKENS = 40  # evaluate.max_new_tokens: a whole order's JSON

MISTAKES = ("customer_is_city", "misspelled", "other_item")

PAIR_NAMES = [
    "Ottilie", "Bartholomew", "Xiomara", "Leopold", "Anouk", "Thaddeus", "Ingrid", "Cosimo", "Marisol", "Radek",
    "Sunniva", "Ignatius", "Odalys", "Wojciech", "Henrike", "Lorcan", "Evander", "Priya", "Tobiah", "Celestine",
]
PAIR_ITEMS = [
    "colander", "ladle", "whisk", "trowel", "hammock", "spatula", "tureen", "funnel", "satchel", "kayak", "cleaver",
    "saucepan", "wok", "tripod", "compass", "flask",
]
PAIR_CITIES = [
    "Reykjavik", "Tbilisi", "Windhoek", "Gdansk", "Vilnius", "Asuncion", "Bratislava", "Kampala", "Trondheim",
    "Cordoba", "Nagoya", "Antwerp", "Dakar", "Hobart", "Tromso", "Valparaiso",
]


def misspell(word: str, rng: random.Random) -> str:
    """A copy with one letter dropped or doubled, or two swapped (never the word itself)."""
    while True:
        i = rng.randrange(1, len(word))
        kind = rng.choice(("drop", "double", "swap"))
        if kind == "drop":
            copy = word[:i] + word[i + 1:]
        elif kind == "double":
            copy = word[:i] + word[i] + word[i:]
        else:
            copy = word[:i - 1] + word[i] + word[i - 1] + word[i + 1:]
        if copy != word:
            return copy


def mistaken(order: dict, mistake: str, rng: random.Random) -> dict:
    """The order with one mistake of the kind the SFT model makes; a word put in the wrong place is one it
    learned (a training item or city), as measured."""
    wrong = dict(order)
    if mistake == "customer_is_city":
        wrong["customer"] = order["city"]
    elif mistake == "misspelled":
        field = rng.choice(("customer", "item", "city"))
        wrong[field] = misspell(order[field], rng)
    elif mistake == "other_item":
        wrong["item"] = rng.choice(default_set.TRAIN_ITEMS)
    else:
        wrong["city"] = rng.choice(default_set.TRAIN_CITIES)
    return wrong


def pairs(rng: random.Random, count: int, names, items, cities, templates) -> list[dict]:
    examples: list[dict] = []
    default_set._unique(examples, lambda: default_set.json_example(rng, names, items, cities, templates), count)
    out = []
    for n, example in enumerate(examples):
        order = json.loads(example["output"])
        rejected = mistaken(order, MISTAKES[n % len(MISTAKES)], rng)
        out.append({"instruction": example["instruction"], "input": example["input"],
                    "chosen": example["output"], "rejected": json.dumps(rejected)})
    return out


def generate(seed: int = 0, train_pairs: int = 240, heldout_pairs: int = 60) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"preference-{seed}")
    train = pairs(rng, train_pairs, PAIR_NAMES, PAIR_ITEMS, PAIR_CITIES, default_set.TRAIN_TEMPLATES)
    heldout = pairs(rng, heldout_pairs, default_set.HELDOUT_NAMES, default_set.HELDOUT_ITEMS,
                    default_set.HELDOUT_CITIES, default_set.HELDOUT_TEMPLATES)
    return train, heldout


def prompt_of(pair: dict) -> str:
    """The user turn an Alpaca record becomes (prepare's rendering): instruction, newline, input."""
    return f"{pair['instruction']}\n{pair['input']}" if pair["input"] else pair["instruction"]


def with_model_mistakes(pairs: list[dict], answers: list[str]) -> tuple[list[dict], int]:
    """Each pair's rejected answer replaced by the model's own answer to its prompt wherever that answer is
    not the chosen one; returns the pairs and how many took the model's answer."""
    out, taken = [], 0
    for pair, answer in zip(pairs, answers, strict=True):
        answer = answer.strip()
        if answer and answer != pair["chosen"]:
            pair, taken = {**pair, "rejected": answer}, taken + 1
        out.append(pair)
    return out, taken


def model_answers(model: str | Path, pairs: list[dict]) -> list[str]:
    """The model's greedy answers to the pairs' prompts, through the chat template (ftq.data.replay)."""
    from ftq.data import replay

    rows = replay.answer(model, [prompt_of(p) for p in pairs], max_new_tokens=ANSWER_TOKENS, batch_size=48,
                         temperature=0.0)
    return [r["output"] for r in rows]


def write(folder: str | Path, seed: int = 0, model: str | Path | None = None) -> list[Path]:
    """preference.json and preference_heldout.json; with `model`, the training pairs reject the model's own
    wrong answers (with_model_mistakes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, heldout = generate(seed)
    if model is not None:
        train, taken = with_model_mistakes(train, model_answers(model, train))
        log.info("%d of %d training pairs reject %s's own answer", taken, len(train), model)
    paths = []
    for name, records in zip(("preference.json", "preference_heldout.json"), (train, heldout)):
        path = folder / name
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
