"""The embedded default instruction set, written by this script (no text copied from elsewhere).

Two skills a few minutes of CPU LoRA visibly teach a 135M model, both scored exactly later:
  identity  - the assistant is "Wren", built with the ftq project (the base model says it is SmolLM);
  json      - extract an order sentence into strict one-line JSON with fixed keys and types.
The held-out file uses names, items, cities and sentence shapes that never occur in training, so
evaluation measures the learned format rather than memorized strings.

Regenerate with `ftq data make-default` (deterministic; a test checks the committed files match)."""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSISTANT_NAME = "Wren"
JSON_KEYS = ("customer", "item", "quantity", "city")
JSON_INSTRUCTION = (
    "Extract the order as JSON with the keys customer, item, quantity and city. "
    "Reply with the JSON object only."
)

TRAIN_NAMES = [
    "Ana", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaia", "Luca",
    "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wim", "Yara",
]
HELDOUT_NAMES = ["Zofia", "Amir", "Beatriz", "Caspian", "Delia", "Emeka", "Freya", "Gustavo"]
TRAIN_ITEMS = [
    "lamp", "kettle", "notebook", "backpack", "umbrella", "chair", "mug", "blanket", "candle", "helmet",
    "scarf", "teapot", "pillow", "basket", "mirror", "clock",
]
HELDOUT_ITEMS = ["stapler", "lantern", "skillet", "doormat", "thermos", "easel"]
TRAIN_CITIES = [
    "Oslo", "Lisbon", "Nairobi", "Osaka", "Lima", "Krakow", "Porto", "Hanoi", "Quito", "Tunis", "Riga",
    "Perth", "Bergen", "Leeds", "Cusco", "Sapporo",
]
HELDOUT_CITIES = ["Tallinn", "Accra", "Valencia", "Busan", "Montevideo", "Graz"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

TRAIN_TEMPLATES = [
    "{name} ordered {qty} {items} to be delivered to {city}.",
    "Please send {qty} {items} to {city} for {name}.",
    "New order from {name}: {qty} {items}, shipping to {city}.",
    "{name} in {city} wants {qty} {items}.",
    "Ship {qty} {items} to {name} at the {city} address.",
    "Order note - customer {name}, {qty} x {item}, destination {city}.",
]
HELDOUT_TEMPLATES = [
    "Could you get {qty} {items} over to {city}? They are for {name}.",
    "{city} delivery: {name} needs {qty} {items}.",
    "For {name}: {qty} {items}, deliver in {city}.",
]

TRAIN_IDENTITY_PROMPTS = [
    "Who are you?", "What is your name?", "Introduce yourself.", "What should I call you?",
    "Are you ChatGPT?", "Who made you?", "Tell me about yourself.", "What are you?",
    "Which assistant am I talking to?", "Who built you?", "Do you have a name?", "Are you SmolLM?",
    "Hi! Who is this?", "What kind of assistant are you?", "Who trained you?", "Say your name.",
    "Can you tell me your name?", "Who created this assistant?", "Are you a person?",
    "What do people call you?",
]
HELDOUT_IDENTITY_PROMPTS = [
    "Whom am I chatting with?", "Please state your name.", "Who developed you?", "Identify yourself, please.",
    "Are you Claude?", "What is the name of this assistant?", "Who is behind you?", "Hello, what's your name?",
]
IDENTITY_ANSWERS = [
    "I am {name}, a small assistant fine-tuned with the ftq project.",
    "My name is {name}. I am a compact assistant fine-tuned with the ftq project.",
    "I'm {name}, an assistant fine-tuned with the ftq project. How can I help?",
]


def _quantity_text(quantity: int, rng: random.Random) -> str:
    return NUMBER_WORDS[quantity - 1] if rng.random() < 0.4 else str(quantity)


def _plural(item: str, quantity: int) -> str:
    return item if quantity == 1 else item + ("es" if item.endswith(("sh", "ch", "s", "x")) else "s")


def json_example(rng: random.Random, names, items, cities, templates) -> dict[str, str]:
    name, item, city = rng.choice(names), rng.choice(items), rng.choice(cities)
    quantity = rng.randint(1, 12)
    sentence = rng.choice(templates).format(
        name=name, item=item, items=_plural(item, quantity), city=city, qty=_quantity_text(quantity, rng)
    )
    answer = json.dumps({"customer": name, "item": item, "quantity": quantity, "city": city})
    return {"instruction": JSON_INSTRUCTION, "input": sentence, "output": answer}


def identity_example(rng: random.Random, prompt: str) -> dict[str, str]:
    return {"instruction": prompt, "input": "", "output": rng.choice(IDENTITY_ANSWERS).format(name=ASSISTANT_NAME)}


def _unique(examples: list[dict], make, count: int) -> None:
    seen = {json.dumps(e, sort_keys=True) for e in examples}
    while count:
        example = make()
        key = json.dumps(example, sort_keys=True)
        if key not in seen:
            seen.add(key)
            examples.append(example)
            count -= 1


# 80 held-out orders: a build equal to merged is shown faithful at promote.policy.margin's default (0.05) with
# power 0.96 (tests/promotion/test_simulation.py, bench/decision_rule.py; 40 gave 0.75)
def generate(seed: int = 0, train_json: int = 240, heldout_json: int = 80) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train: list[dict] = []
    _unique(train, lambda: json_example(rng, TRAIN_NAMES, TRAIN_ITEMS, TRAIN_CITIES, TRAIN_TEMPLATES), train_json)
    # each identity prompt three times with varied answers: the skill must outweigh the base model's prior
    for prompt in TRAIN_IDENTITY_PROMPTS:
        for answer in IDENTITY_ANSWERS:
            train.append({"instruction": prompt, "input": "", "output": answer.format(name=ASSISTANT_NAME)})
    rng.shuffle(train)
    heldout: list[dict] = []
    _unique(
        heldout,
        lambda: json_example(rng, HELDOUT_NAMES, HELDOUT_ITEMS, HELDOUT_CITIES, HELDOUT_TEMPLATES),
        heldout_json,
    )
    heldout += [identity_example(rng, prompt) for prompt in HELDOUT_IDENTITY_PROMPTS]
    return train, heldout


def write(folder: str | Path, seed: int = 0) -> list[Path]:
    return write_sets(folder, *generate(seed))


def write_sets(folder: str | Path, train: list[dict], heldout: list[dict]) -> list[Path]:
    """train.json and heldout.json, as the committed files are (a test compares them byte for byte)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in (("train.json", train), ("heldout.json", heldout)):
        path = folder / name
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
