"""The llama.cpp runtime (llama-cpp-python), for GGUF files.

Scoring evaluates token ids directly and reads llama.cpp's logits, instead of the `echo` logprobs of
the completion API, which llama-cpp-python 0.3.36 shifts by one token for models without a BOS token."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

# OMP_WAIT_POLICY is left as the user set it. libgomp's default (spin briefly, then sleep) is what
# llama.cpp is fast with: PASSIVE (sleep at once) woke its workers for every matrix of every token and
# cut an evaluation's decode from ~95 to 34 tok/s on 2 cores here; ACTIVE would spin while idle.
from ftq.runtimes import default_threads, gpu_layers


class LlamaCppRuntime:
    kind = "llama.cpp"

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 2048, verbose: bool = False,
                 gpu: bool = True):
        self.path = Path(path)
        self.gpu = gpu  # False: the weights stay in RAM (where another process already holds them in VRAM)
        self.threads = threads or default_threads()
        self.n_ctx = n_ctx
        self.verbose = verbose  # llama.cpp's own load log on stderr (e.g. how many layers it offloaded)
        # one Llama (one copy of the weights, one context) answers chats and scores: on a GPU a second one
        # would hold the weights twice in VRAM, and a GGUF over half the card could not be checked at all
        self._model = None

    def _load(self):
        from llama_cpp import Llama

        # flash attention, as llama.cpp's own tools and llama-server pick it (auto) where llama-cpp-python
        # turns it off: HellaSwag scoring 1.34x faster on 2 cores, decode a little faster
        return Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads,
                     n_gpu_layers=gpu_layers() if self.gpu else 0, flash_attn=True, verbose=self.verbose)

    @property
    def llama(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             tools: list[dict] | None = None) -> str:
        """`tools` are for a chat template that renders them itself: the GGUF's template renders the prompt
        as transformers renders it in training (see ftq.data.tools).

        Each answer starts from an empty context: llama-cpp-python would reuse the longest prefix the last
        prompt shares with this one and evaluate only the rest as a second batch, and the floats then differ
        a little from a whole-prompt batch, enough to flip a greedy token on close calls (a q4_k_m build
        answered 3 of 40 held-out orders differently after a one-token warm-up). An answer depends on its
        prompt only, whatever was asked before."""
        self.llama.reset()
        if tools:
            prompt = self._template_renderer()(messages, tools, True)
            reply = self.llama.create_completion(prompt, max_tokens=max_new_tokens, temperature=temperature, seed=0)
            return (reply["choices"][0]["text"] or "").strip()
        reply = self.llama.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=temperature,
                                                  seed=0)
        return (reply["choices"][0]["message"]["content"] or "").strip()

    def _template_renderer(self):
        from ftq.data.tools import template_renderer

        info = self.tokenizer_info()
        return template_renderer(info["chat_template"], {"bos_token": info["bos_token"], "eos_token": info["eos_token"]})

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

    def timed_generation(self, messages: list[dict], tokens: int) -> dict:
        """Exactly `tokens` greedy tokens: llama-cpp-python's generate() never stops by itself (the end
        of sequence is create_completion's stop), so every candidate does the same work. Time to the
        first token (prefill included) and to the last, and the count of tokens llama.cpp generated."""
        import time

        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        info = self.tokenizer_info()
        prompt = Jinja2ChatFormatter(info["chat_template"], eos_token=info["eos_token"], bos_token=info["bos_token"] or "",
                                     add_generation_prompt=True)(messages=messages).prompt
        ids = self.tokenize(prompt, add_special=True)
        self.llama.reset()  # no prefix reuse from an earlier prompt: the whole prompt is evaluated, as in transformers
        started = time.perf_counter()
        first, generated = None, 0
        for _ in self.llama.generate(ids, top_k=1, temp=0.0, reset=True):
            generated += 1
            if first is None:
                first = time.perf_counter()
            if generated == tokens:
                break
        ended = time.perf_counter()
        return {"ttft_seconds": first - started, "decode_seconds": ended - first, "tokens": generated}

    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode(), add_bos=False, special=True)) if text else 0

    def prompt_tokens(self, messages: list[dict]) -> int:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            return sum(self.count_tokens(m["content"]) for m in messages)
        formatter = Jinja2ChatFormatter(template, eos_token="", bos_token="", add_generation_prompt=True)
        return self.count_tokens(formatter(messages=messages).prompt)

    # Token-level access, for scoring and for the server's echo/logprobs completions (lm-eval's
    # local-completions talks to it with the model's own token ids).
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.llama.tokenize(text.encode(), add_bos=add_special and self._adds_bos(), special=True))

    def detokenize(self, token_ids: list[int]) -> str:
        return self.llama.detokenize(list(token_ids), special=False).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self.llama.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def _adds_bos(self) -> bool:
        return str(self.llama.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"

    def eos_token_ids(self) -> set[int]:
        return {t for t in (self.llama.token_eos(), self.llama._model.token_eot()) if t is not None and t >= 0}

    def tokenizer_info(self) -> dict:
        metadata = self.llama.metadata
        bos = int(metadata["tokenizer.ggml.bos_token_id"]) if "tokenizer.ggml.bos_token_id" in metadata else None
        pad = int(metadata["tokenizer.ggml.padding_token_id"]) if "tokenizer.ggml.padding_token_id" in metadata else None
        return {"eos_token": self.token_text(self.llama.token_eos()),
                "bos_token": self.token_text(bos) if bos is not None else None,
                "pad_token": self.token_text(pad) if pad is not None else None,
                "chat_template": metadata.get("tokenizer.chat_template"),
                "model_max_length": self.n_ctx, "vocab_size": self.llama.n_vocab()}

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits after each prefix of `token_ids` ([n, vocab]); `next_logits` continues from here."""
        self._check_room(0, len(token_ids))
        return np.concatenate(list(self._decode(token_ids, n_past=0)))

    def next_logits(self, token_id: int) -> np.ndarray:
        """Continues after the tokens the context last evaluated (those of `logits`, where no chat came between)."""
        n_past = self.llama.n_tokens
        if n_past >= self.n_ctx:
            raise ValueError(f"generation reached the context of {self.n_ctx} tokens")
        return next(self._decode([token_id], n_past))[0]

    def sequence_nll(self, token_ids: list[int], scored: list[bool] | None = None) -> tuple[float, int]:
        """Summed negative log-likelihood of token_ids[1:] (where `scored`), chunk by chunk."""
        self._check_room(0, len(token_ids))
        targets = np.asarray(token_ids[1:])
        keep = np.asarray(scored[1:], dtype=bool) if scored is not None else np.ones(len(targets), dtype=bool)
        total, start = 0.0, 0
        for chunk in self._decode(token_ids, n_past=0):
            rows = np.arange(start, min(start + len(chunk), len(targets)))
            start += len(chunk)
            if not len(rows):
                continue
            logits = chunk[: len(rows)].astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            total += float(-logprobs[np.arange(len(rows)), targets[rows]][keep[rows]].sum())
        return total, int(keep.sum())

    def _check_room(self, n_past: int, n: int) -> None:
        if n_past + n > self.n_ctx:
            raise ValueError(f"sequence of {n_past + n} tokens exceeds the context of {self.n_ctx}")

    def _decode(self, token_ids: list[int], n_past: int) -> Iterator[np.ndarray]:
        """Evaluate token_ids after the first n_past cached tokens, n_batch at a time, yielding each batch's
        logits ([k, vocab], a copy). Memory for logits is n_batch x vocabulary, where llama-cpp-python's
        logits_all keeps context x vocabulary float32 logits (gigabytes at a 4k context and a 128k
        vocabulary) for the model's lifetime."""
        llm = self.llama  # the chat model itself scores (see __init__): logits per batch
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        vocab = llm.n_vocab()
        for start in range(0, len(token_ids), llm.n_batch):
            chunk = list(token_ids[start : start + llm.n_batch])
            llm._batch.set_batch(batch=chunk, n_past=n_past + start, logits_all=True)
            llm._ctx.decode(llm._batch)
            # the context's bookkeeping as Llama.eval keeps it: a later chat or stream reuses a cached prefix
            # only where these ids say the cache holds it, and decodes again rather than sample these logits
            llm.input_ids[n_past + start : n_past + start + len(chunk)] = chunk
            llm.n_tokens = n_past + start + len(chunk)
            llm._requires_eval = True
            yield np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), vocab)).copy()

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
        self._model = None
