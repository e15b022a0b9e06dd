"""Replay data for the embedded default set: general prompts written by this project, answered by the
base model itself, so that fine-tuning on the narrow task keeps what the base could already do.

Training on a few hundred identity and JSON examples alone pulls a 135M model away from everything
else (general-text word perplexity rose, and "What is the capital of France?" was answered with an
introduction). Mixing in the base model's own greedy answers to general prompts is replay
(self-distillation): the loss on those rows is lowest where the model stays as it was, and no text is
copied from anywhere. The prompts avoid identity questions (the task teaches a new name) and the
general questions `evaluate.general` asks (so the retention check measures, not memorizes).

The answers are sampled at temperature 1 (seeded), not greedy: a sample from the model's own
distribution leaves that distribution where it was (the expected gradient of its log-likelihood is
zero at the base model), so replay pulls the fine-tune back toward the base without sharpening it.
Greedy answers are the mode, and training on them made the model over-confident: plain-text word
perplexity rose more with greedy replay than without any replay (LoRA lr 1e-3).

Regenerate with `ftq data make-default --replay` (needs models/base: `dvc repro base`); seeded, so
deterministic on a given machine. A test checks the committed prompts match GENERAL_PROMPTS.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERAL_PROMPTS = [
    # facts and explanations
    "Why is the sky blue? Answer in two sentences.",
    "What causes the seasons on Earth?",
    "Explain what photosynthesis is in simple words.",
    "How many days are there in a leap year?",
    "What is the largest planet in our solar system?",
    "What is the boiling point of water at sea level in Celsius?",
    "Name the three states of matter.",
    "What do bees make?",
    "How many continents are there? Name them.",
    "What is the chemical symbol for gold?",
    "Why do we have day and night?",
    "What is gravity?",
    "What does a thermometer measure?",
    "How do plants get water?",
    "What is the longest river in Africa?",
    "What is the freezing point of water in Fahrenheit?",
    "Which gas do humans breathe out?",
    "What is a mammal? Give two examples.",
    "Why do leaves change colour in autumn?",
    "What is the difference between weather and climate?",
    "How many legs does a spider have?",
    "What is the main language spoken in Brazil?",
    "Which ocean is the largest?",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "Who wrote Romeo and Juliet?",
    "What is the tallest mountain in the world?",
    "What is a volcano?",
    "Why does ice float on water?",
    "What is the sun made of?",
    # everyday advice
    "Give me three tips for sleeping better.",
    "How can I save money on groceries?",
    "What should I pack for a day hike?",
    "How do I make a cup of tea?",
    "Suggest a healthy breakfast.",
    "How can I stay focused while studying?",
    "What are some ways to reduce stress?",
    "How do I care for a houseplant?",
    "Give me two ideas for a rainy afternoon.",
    "How often should I drink water during the day?",
    "What is a good way to learn new vocabulary?",
    "How do I prepare for a job interview?",
    "What should I do if I cut my finger slightly?",
    "How can I be more productive in the morning?",
    "Give me a simple recipe for scrambled eggs.",
    # writing
    "Write a short poem about the moon.",
    "Write one sentence describing a forest in winter.",
    "Write a two-line poem about coffee.",
    "Describe a sunset in one sentence.",
    "Write a short thank-you note to a friend.",
    "Write a haiku about rain.",
    "Give me a title for a story about a lost dog.",
    "Write a friendly greeting for a birthday card.",
    "Describe the smell of fresh bread.",
    "Write a short motivational sentence for a Monday morning.",
    "Write a limerick about a cat.",
    "Summarize the story of Cinderella in two sentences.",
    "Write a short product description for a reusable water bottle.",
    "Write an opening line for a mystery novel.",
    "Describe a busy city street in two sentences.",
    # reasoning and arithmetic
    "What is 15 plus 27?",
    "What is 9 times 8?",
    "If I have 10 apples and eat 3, how many are left?",
    "What is half of 50?",
    "Which is heavier, a kilogram of feathers or a kilogram of stones?",
    "What comes next in the sequence 2, 4, 6, 8?",
    "How many minutes are in two hours?",
    "What is 100 divided by 4?",
    "Is 17 a prime number?",
    "What is the square root of 81?",
    # language
    "What is the opposite of 'ancient'?",
    "Give me a synonym for 'happy'.",
    "What does the word 'generous' mean?",
    "Use the word 'curious' in a sentence.",
    "What is the plural of 'mouse'?",
    "Translate 'thank you' into French.",
    "What is a noun? Give an example.",
    "Correct this sentence: 'She go to school every day.'",
    "What is the past tense of 'run'?",
    "Explain the difference between 'their' and 'there'.",
    # technology and general
    "What is the internet?",
    "What does a computer's CPU do?",
    "Explain what an email is to a child.",
    "What is a password and why should it be strong?",
    "What is recycling and why is it useful?",
    "What are the benefits of regular exercise?",
    "Why is it important to wash your hands?",
    "What is a library?",
    "How does a bicycle work?",
    "What is the purpose of a map?",
    "Name three musical instruments.",
    "What is the difference between a lake and a sea?",
    "Why do people use umbrellas?",
    "What is a healthy snack?",
    "What is democracy?",
    "Why should we protect forests?",
]

GENERATION = {"max_new_tokens": 192, "batch_size": 8, "temperature": 1.0, "seed": 0}


def answer(base: str | Path, prompts: list[str], max_new_tokens: int = GENERATION["max_new_tokens"],
           batch_size: int = GENERATION["batch_size"], temperature: float = GENERATION["temperature"],
           seed: int = GENERATION["seed"]) -> list[dict]:
    """The base model's answer to each prompt, sampled (greedy at temperature 0), through the chat
    template the task is trained with; `finished` is False where it ran out of tokens (such rows are
    not written)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        inputs = tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in batch],
                                               add_generation_prompt=True, padding=True, return_tensors="pt",
                                               return_dict=True)
        torch.manual_seed(seed + start)  # each batch seeded on its own: a rerun of any batch is the same
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    **sampling)
        for prompt, tokens in zip(batch, output[:, inputs["input_ids"].shape[1]:].tolist()):
            finished = tokenizer.eos_token_id in tokens
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            rows.append({"instruction": prompt, "input": "", "output": text, "finished": finished})
    return rows


def write(folder: str | Path, base: str | Path) -> Path:
    """data/raw/ftq_default/replay.json: the finished answers, in Alpaca format."""
    rows = answer(base, GENERAL_PROMPTS)
    kept = [{k: r[k] for k in ("instruction", "input", "output")} for r in rows if r["finished"] and r["output"]]
    path = Path(folder) / "replay.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
