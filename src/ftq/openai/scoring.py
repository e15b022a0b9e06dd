"""Completions with token log-probabilities (`logprobs`, `echo`) and token-id prompts, as OpenAI's
legacy /v1/completions defines them and as lm-eval's `local-completions` model uses them.

Log-probabilities come from the runtime's own logits, one forward pass over the prompt and one step per
generated token, so an echoed prompt is scored exactly: token i's logprob is log p(token i | tokens < i),
and the first token, which has no context, gets null (OpenAI's convention). This is what llama-cpp-python's
own server gets wrong by one token for models without a BOS token."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from ftq.openai.schema import CompletionRequest, Limits, RequestError, check_batch, check_prompt, usage

ROWS_PER_CHUNK = 256  # log-softmax over the vocabulary a chunk of prompt positions at a time (memory)


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class TokenLogprobs:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[dict[str, float] | None] = field(default_factory=list)

    def add(self, token: int, logprobs_row: np.ndarray | None, top_k: int, token_text) -> None:
        self.tokens.append(int(token))
        if logprobs_row is None:
            self.logprobs.append(None)
            self.top.append(None)
            return
        self.logprobs.append(float(logprobs_row[token]))
        self.top.append(top_entries(logprobs_row, top_k, token_text) if top_k else None)


def top_entries(row: np.ndarray, k: int, token_text) -> dict[str, float]:
    best = np.argpartition(-row, k - 1)[:k]
    best = best[np.argsort(-row[best])]
    return {token_text(int(t)): float(row[t]) for t in best}


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt: TokenLogprobs
    generated: TokenLogprobs


def choose(row: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(row))
    probs = np.exp(log_softmax(row / temperature))
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


def complete(runtime, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop: list[str] | None = None, top_k: int = 0, echo: bool = False, seed: int | None = None) -> Completion:
    """Score the prompt (when echoed) and generate up to `max_tokens` tokens, keeping each one's logprob."""
    logits = runtime.logits(prompt_ids)
    prompt = TokenLogprobs()
    if echo:
        prompt.add(prompt_ids[0], None, top_k, runtime.token_text)
        for start in range(0, len(prompt_ids) - 1, ROWS_PER_CHUNK):
            rows = log_softmax(logits[start: min(len(prompt_ids) - 1, start + ROWS_PER_CHUNK)])
            for offset, row in enumerate(rows):
                prompt.add(prompt_ids[start + offset + 1], row, top_k, runtime.token_text)
    row, generated, text = logits[-1], TokenLogprobs(), ""
    eos = runtime.eos_token_ids()
    rng = np.random.default_rng(seed)
    finish = "length"
    for step in range(max_tokens):
        logprobs = log_softmax(row)
        token = choose(row, temperature, top_p, rng)
        generated.add(token, logprobs, top_k, runtime.token_text)
        if token in eos:  # kept in the logprobs (as vLLM does), never in the text
            finish = "stop"
            break
        text = runtime.detokenize([t for t in generated.tokens if t not in eos])
        cut = min((text.find(s) for s in stop or [] if s and s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        if step + 1 < max_tokens:
            row = runtime.next_logits(token)
    return Completion(text, finish, prompt, generated)


def logprobs_payload(completion: Completion, prompt_text: str, echo: bool, token_text) -> dict:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    parts = [completion.prompt, completion.generated] if echo else [completion.generated]
    tokens = [t for part in parts for t in part.tokens]
    texts = [token_text(t) for t in tokens]
    offsets, position = [], 0 if echo else len(prompt_text)
    for piece in texts:
        offsets.append(position)
        position += len(piece)
    return {"tokens": texts, "token_logprobs": [lp for part in parts for lp in part.logprobs],
            "top_logprobs": [top for part in parts for top in part.top], "text_offset": offsets}


def prompt_ids(runtime, body: CompletionRequest) -> list[list[int]]:
    """Every prompt of a request as token ids, checked against the vocabulary."""
    vocab = runtime.tokenizer_info()["vocab_size"]
    batch = []
    for index, prompt in enumerate(body.prompts()):
        ids = runtime.tokenize(prompt, add_special=True) if isinstance(prompt, str) else prompt
        if not ids:
            raise RequestError(f"prompt[{index}]: no tokens")
        if any(t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt[{index}]: token ids must be in [0, {vocab})")
        batch.append(ids)
    return batch


def check_prompts(batch: list[list[int]], limits: Limits, max_tokens: int, context: int) -> None:
    check_batch(limits, [len(ids) for ids in batch], max_tokens)
    for index, ids in enumerate(batch):
        check_prompt(limits, len(ids), max_tokens, context, f"prompt[{index}]")


def scored_completions(runtime, body: CompletionRequest, batch: list[list[int]], max_tokens: int, model: str) -> dict:
    """A /v1/completions answer for already checked token-id prompts, with exact logprobs when asked."""
    choices, prompt_total, completion_total = [], 0, 0
    for index, (prompt, ids) in enumerate(zip(body.prompts(), batch)):
        done = complete(runtime, ids, max_tokens, body.temperature, body.top_p, body.stop_list(), body.logprobs or 0,
                        body.echo, body.seed)
        prompt_text = prompt if isinstance(prompt, str) else runtime.detokenize(ids)
        logprobs = (logprobs_payload(done, prompt_text, body.echo, runtime.token_text)
                    if body.logprobs is not None else None)
        choices.append({"index": index, "text": (prompt_text if body.echo else "") + done.text,
                        "finish_reason": done.finish_reason, "logprobs": logprobs})
        prompt_total += len(ids)
        completion_total += len(done.generated.tokens)
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_total, completion_total)}
