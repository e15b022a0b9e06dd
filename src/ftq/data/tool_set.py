"""The embedded tool-calling set, written by this script (invented functions and text, nothing copied):
two functions, `convert_units` and `lookup_order`, in LLaMA-Factory's ShareGPT layout (a `tools` field
holding the function schemas as JSON text, `function_call` and `observation` turns), so it is also the
test of that public format. Each conversation: the user asks, the assistant calls, the tool answers,
the assistant replies; a few ask something no tool is for and get a plain answer.

The held-out file uses values, order numbers, unit pairs and phrasings that never occur in training.
Regenerate with `ftq data make-default` (deterministic; a test checks the committed files match)."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOOLS = [
    {"name": "convert_units",
     "description": "Convert a quantity from one unit to another.",
     "parameters": {"type": "object", "properties": {
         "value": {"type": "number", "description": "the quantity to convert"},
         "from_unit": {"type": "string", "enum": ["kilometer", "mile", "kilogram", "pound", "liter", "gallon",
                                                  "meter", "foot", "celsius", "fahrenheit"]},
         "to_unit": {"type": "string", "enum": ["kilometer", "mile", "kilogram", "pound", "liter", "gallon",
                                                "meter", "foot", "celsius", "fahrenheit"]}},
         "required": ["value", "from_unit", "to_unit"]}},
    {"name": "lookup_order",
     "description": "Look up the status of a customer order by its order number.",
     "parameters": {"type": "object", "properties": {
         "order_id": {"type": "string", "description": "the order number, such as A-1042"}},
         "required": ["order_id"]}},
]
PLURAL = {"kilometer": "kilometers", "mile": "miles", "kilogram": "kilograms", "pound": "pounds", "liter": "liters",
          "gallon": "gallons", "meter": "meters", "foot": "feet", "celsius": "degrees Celsius",
          "fahrenheit": "degrees Fahrenheit"}
FACTORS = {("kilometer", "mile"): 0.621371, ("mile", "kilometer"): 1.609344, ("kilogram", "pound"): 2.204623,
           ("pound", "kilogram"): 0.453592, ("liter", "gallon"): 0.264172, ("gallon", "liter"): 3.785412,
           ("meter", "foot"): 3.280840, ("foot", "meter"): 0.3048}
TRAIN_PAIRS = [("kilometer", "mile"), ("mile", "kilometer"), ("kilogram", "pound"), ("pound", "kilogram"),
               ("celsius", "fahrenheit"), ("meter", "foot")]
HELDOUT_PAIRS = [("liter", "gallon"), ("gallon", "liter"), ("fahrenheit", "celsius"), ("foot", "meter")]
TRAIN_CONVERT = [
    "How many {to} is {value} {from_}?",
    "Convert {value} {from_} to {to}.",
    "What is {value} {from_} in {to}?",
    "Please turn {value} {from_} into {to}.",
    "I have {value} {from_}. How much is that in {to}?",
]
HELDOUT_CONVERT = [
    "Could you express {value} {from_} in {to}?",
    "{value} {from_} equals how many {to}?",
]
TRAIN_ORDER = [
    "Where is my order {order}?",
    "What is the status of order {order}?",
    "Has order {order} shipped yet?",
    "Can you check order {order} for me?",
    "Track order {order}, please.",
]
HELDOUT_ORDER = [
    "Any news on my package, order number {order}?",
    "I am waiting for {order}. Where is it now?",
]
STATUSES = [("shipped", "It has shipped and should arrive on {day}."), ("processing", "It is still being prepared; "
            "the expected delivery date is {day}."), ("delivered", "It was delivered on {day}.")]
TRAIN_PLAIN = [
    ("Hello!", "Hello! I can convert units and look up orders. What do you need?"),
    ("Thanks, that's all.", "You're welcome. Have a nice day!"),
    ("What can you do?", "I can convert quantities between units and look up the status of an order."),
    ("Who are you?", "I am an assistant that converts units and looks up orders."),
    ("Good morning.", "Good morning! Do you need a conversion or an order status?"),
]
HELDOUT_PLAIN = [
    ("Hi there, how are you?", "I'm fine, thanks. I can convert units and look up orders. What do you need?"),
    ("Thank you very much!", "You're welcome. Have a nice day!"),
]


def _number(rng: random.Random) -> int | float:
    return rng.randint(2, 250) if rng.random() < 0.7 else round(rng.uniform(1, 100), 1)


def _converted(value: float, from_unit: str, to_unit: str) -> float:
    if (from_unit, to_unit) == ("celsius", "fahrenheit"):
        return round(value * 9 / 5 + 32, 2)
    if (from_unit, to_unit) == ("fahrenheit", "celsius"):
        return round((value - 32) * 5 / 9, 2)
    return round(value * FACTORS[(from_unit, to_unit)], 2)


def _record(question: str, call: dict | None, result: dict | None, answer: str) -> dict:
    turns = [{"from": "human", "value": question}]
    if call is not None:
        turns += [{"from": "function_call", "value": json.dumps(call)},
                  {"from": "observation", "value": json.dumps(result)}]
    turns.append({"from": "gpt", "value": answer})
    return {"conversations": turns, "tools": json.dumps(TOOLS)}


def convert_example(rng: random.Random, pairs, templates) -> dict:
    from_unit, to_unit = rng.choice(pairs)
    value = _number(rng)
    question = rng.choice(templates).format(value=value, from_=PLURAL[from_unit], to=PLURAL[to_unit])
    result = _converted(value, from_unit, to_unit)
    call = {"name": "convert_units", "arguments": {"value": value, "from_unit": from_unit, "to_unit": to_unit}}
    return _record(question, call, {"result": result}, f"{value} {PLURAL[from_unit]} is {result} {PLURAL[to_unit]}.")


def order_example(rng: random.Random, letters: str, templates) -> dict:
    order = f"{rng.choice(letters)}-{rng.randint(1000, 9999)}"
    status, sentence = rng.choice(STATUSES)
    day = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    call = {"name": "lookup_order", "arguments": {"order_id": order}}
    return _record(rng.choice(templates).format(order=order), call, {"order_id": order, "status": status, "date": day},
                   f"Order {order}: " + sentence.format(day=day))


def generate(seed: int = 0, train_calls: int = 160, heldout_calls: int = 32) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)

    def calls(count: int, pairs, convert, letters, order) -> list[dict]:
        made, seen = [], set()
        while len(made) < count:
            record = (convert_example(rng, pairs, convert) if len(made) % 2 == 0
                      else order_example(rng, letters, order))
            key = json.dumps(record, sort_keys=True)
            if key not in seen:
                seen.add(key)
                made.append(record)
        return made

    train = calls(train_calls, TRAIN_PAIRS, TRAIN_CONVERT, "ABCDEF", TRAIN_ORDER)
    train += [_record(q, None, None, a) for q, a in TRAIN_PLAIN]
    rng.shuffle(train)
    heldout = calls(heldout_calls, HELDOUT_PAIRS, HELDOUT_CONVERT, "XYZ", HELDOUT_ORDER)
    heldout += [_record(q, None, None, a) for q, a in HELDOUT_PLAIN]
    return train, heldout


def write(folder: str | Path, seed: int = 0) -> list[Path]:
    from ftq.data.default_set import write_sets

    return write_sets(folder, *generate(seed))
