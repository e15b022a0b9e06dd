"""The default preference pairs (`ftq data make-default` writes data/raw/ftq_default/preference.json and
preference_heldout.json, LLaMA-Factory's Alpaca ranking layout): the right order extraction as `chosen`
against one of the mistakes the SFT model is measured to make on the held-out orders as `rejected`.

Measured on the demo's merged model (reports/eval/merged.answers.jsonl, 40 held-out orders): a name,
item or city copied with letters lost or changed ("Caspian" -> "Caspin", "Graz" -> "Gazza"), another
item in the item's place ("skillet" -> "kettle"), and the city put where the customer belongs
(`{"customer": "Montevideo", ..., "city": "Montevideo"}`). Each pair's prompt is an order of the same
kind as the SFT data's (the training pairs from the training names, items and cities; the held-out pairs
from the held-out ones, so `pref_accuracy` is measured on orders no pair was trained on), its rejected
answer one of these mistakes, chosen in turn."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ftq.data import default_set

MISTAKES = ("customer_is_city", "misspelled", "other_item")


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


def mistaken(order: dict, mistake: str, items: list[str], rng: random.Random) -> dict:
    wrong = dict(order)
    if mistake == "customer_is_city":
        wrong["customer"] = order["city"]
    elif mistake == "misspelled":
        field = rng.choice(("customer", "item", "city"))
        wrong[field] = misspell(order[field], rng)
    else:
        wrong["item"] = rng.choice([i for i in items if i != order["item"]])
    return wrong


def pairs(rng: random.Random, count: int, names, items, cities, templates) -> list[dict]:
    examples: list[dict] = []
    default_set._unique(examples, lambda: default_set.json_example(rng, names, items, cities, templates), count)
    out = []
    for n, example in enumerate(examples):
        order = json.loads(example["output"])
        rejected = mistaken(order, MISTAKES[n % len(MISTAKES)], items, rng)
        out.append({"instruction": example["instruction"], "input": example["input"],
                    "chosen": example["output"], "rejected": json.dumps(rejected)})
    return out


def generate(seed: int = 0, train_pairs: int = 240, heldout_pairs: int = 60) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"preference-{seed}")
    train = pairs(rng, train_pairs, default_set.TRAIN_NAMES, default_set.TRAIN_ITEMS, default_set.TRAIN_CITIES,
                  default_set.TRAIN_TEMPLATES)
    heldout = pairs(rng, heldout_pairs, default_set.HELDOUT_NAMES, default_set.HELDOUT_ITEMS,
                    default_set.HELDOUT_CITIES, default_set.HELDOUT_TEMPLATES)
    return train, heldout


def write(folder: str | Path, seed: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in zip(("preference.json", "preference_heldout.json"), generate(seed)):
        path = folder / name
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
