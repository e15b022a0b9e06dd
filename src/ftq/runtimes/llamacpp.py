"""The llama.cpp runtime (llama-cpp-python), for GGUF files.

Scoring evaluates token ids directly and reads llama.cpp's logits, instead of the `echo` logprobs of
the completion API, which llama-cpp-python 0.3.36 shifts by one token for models without a BOS token."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

# llama.cpp's OpenMP workers spin while idle; on a shared 2-core box that starves everything else
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_threads() -> int:
    return max(1, int(os.environ.get("FTQ_LLAMA_THREADS") or os.cpu_count() or 1))


class LlamaCppRuntime:
    kind = "llama.cpp"

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 2048):
        self.path = Path(path)
        self.threads = threads or default_threads()
        self.n_ctx = n_ctx
        self._chat_model = None
        self._scoring_model = None

    def _load(self, logits_all: bool):
        from llama_cpp import Llama

        return Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads,
                     logits_all=logits_all, verbose=False)

    @property
    def llama(self):
        if self._chat_model is None:
            self._chat_model = self._load(logits_all=False)
        return self._chat_model

    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
        reply = self.llama.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=temperature,
                                                  seed=0)
        return (reply["choices"][0]["message"]["content"] or "").strip()

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                    top_p: float = 1.0, stop: list[str] | None = None) -> Iterator[str]:
        for chunk in self.llama.create_chat_completion(messages=messages, max_tokens=max_new_tokens,
                                                       temperature=temperature, top_p=top_p, stop=stop or None,
                                                       seed=0, stream=True):
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                yield text

    def stream_text(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                    stop: list[str] | None = None) -> Iterator[str]:
        for chunk in self.llama.create_completion(prompt, max_tokens=max_new_tokens, temperature=temperature,
                                                  top_p=top_p, stop=stop or None, seed=0, stream=True):
            text = chunk["choices"][0].get("text")
            if text:
                yield text

    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode(), add_bos=False, special=True)) if text else 0

    def prompt_tokens(self, messages: list[dict]) -> int:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            return sum(self.count_tokens(m["content"]) for m in messages)
        formatter = Jinja2ChatFormatter(template, eos_token="", bos_token="", add_generation_prompt=True)
        return self.count_tokens(formatter(messages=messages).prompt)

    def sequence_nll(self, token_ids: list[int], scored: list[bool] | None = None) -> tuple[float, int]:
        if self._scoring_model is None:
            self._scoring_model = self._load(logits_all=True)
        llm = self._scoring_model
        if len(token_ids) > llm.n_ctx():
            raise ValueError(f"sequence of {len(token_ids)} tokens exceeds the context of {llm.n_ctx()}")
        llm.reset()
        llm.eval(token_ids)
        logits = np.asarray(llm.scores[: len(token_ids) - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        targets = np.asarray(token_ids[1:])
        token_nll = -logprobs[np.arange(len(targets)), targets]
        if scored is not None:
            keep = np.asarray(scored[1:], dtype=bool)
            return float(token_nll[keep].sum()), int(keep.sum())
        return float(token_nll.sum()), len(targets)

    def close(self) -> None:
        for model in (self._chat_model, self._scoring_model):
            if model is not None:
                model.close()
        self._chat_model = self._scoring_model = None
