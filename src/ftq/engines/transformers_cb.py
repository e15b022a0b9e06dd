"""transformers' continuous batching as the engine for HF folders (plain, AWQ/compressed-tensors, GPTQ):
a paged KV cache, requests joining and leaving the running batch between steps, per-request temperature,
top_p and top_k (greedy is top_k 1). One background thread runs the manager; results reach each request's
asyncio queue through `register_result_handler`. Sampling seeds are per engine, not per request: the
manager has one generator."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path
from typing import AsyncIterator

import torch

from ftq.engines import EngineError, Piece, Sampling

BLOCK_SIZE = 32  # tokens per KV-cache page


class TransformersEngine:
    kind = "transformers"

    def __init__(self, path: Path, threads: int | None, n_ctx: int, parallel: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig
        from ftq.hf import load_kwargs

        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.parallel = parallel
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, **load_kwargs())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype="auto", device_map=device, **load_kwargs()).eval()
        self.context_length = min(n_ctx, int(getattr(model.config, "max_position_embeddings", n_ctx)))
        self.vocab_size = int(model.config.vocab_size)
        eos = model.generation_config.eos_token_id
        self.eos = [t for t in (eos if isinstance(eos, list) else [eos, self.tokenizer.eos_token_id]) if t is not None]
        # processors are built from the defaults: a default of 1.0/None would leave no processor to vary per request
        generation = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=256,
                                      eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id)
        blocks = math.ceil(self.context_length * parallel / BLOCK_SIZE) + parallel
        config = ContinuousBatchingConfig(per_request_processors=True, block_size=BLOCK_SIZE, num_blocks=blocks,
                                          max_requests_per_batch=parallel, max_batch_tokens=512)
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        self.manager.start()

    async def warm_up(self) -> None:
        async for _ in self.generate(await self.tokenize("Hi", True), Sampling(max_tokens=1, temperature=0.0)):
            pass

    def alive(self) -> bool:
        thread = self.manager._generation_thread
        return thread is not None and thread.is_alive()

    async def chat_prompt(self, messages: list[dict]) -> str:
        return await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                       tokenize=False)

    async def tokenize(self, text: str, add_special: bool) -> list[int]:
        return await asyncio.to_thread(lambda: list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"]))

    async def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    async def tokenizer_info(self) -> dict:
        return {"eos_token": self.tokenizer.eos_token, "bos_token": self.tokenizer.bos_token,
                "pad_token": self.tokenizer.pad_token, "chat_template": self.tokenizer.chat_template,
                "model_max_length": self.context_length, "vocab_size": self.vocab_size}

    def _sampling_kwargs(self, sampling: Sampling) -> dict:
        if sampling.temperature <= 0:
            return {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
        return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": self.vocab_size}

    async def generate(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[Piece]:
        request_id = uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        self.manager.register_result_handler(request_id, outputs.put_nowait)
        self.manager.add_request(list(prompt), request_id=request_id, max_new_tokens=sampling.max_tokens,
                                 streaming=True, eos_token_id=-1 if sampling.ignore_eos else self.eos,
                                 **self._sampling_kwargs(sampling))
        text = StreamedText(self.tokenizer, sampling.stop)
        finished = False
        try:
            while True:
                output = await outputs.get()
                if output.error:
                    raise EngineError(f"transformers: {output.error}")
                tokens = output.generated_tokens
                done = output.is_finished()
                piece, stopped = text.update(tokens, done)
                if stopped or done:
                    finished = done
                    hit_eos = bool(tokens) and tokens[-1] in self.eos and not sampling.ignore_eos
                    limit = len(tokens) >= sampling.max_tokens and not hit_eos and not stopped
                    yield Piece(piece, len(tokens), "length" if limit else "stop")
                    return
                if piece:
                    yield Piece(piece, len(tokens))
        finally:
            if not finished:  # a stop string, a disconnect or an error: free the sequence's pages now
                self.manager.cancel_request(request_id)

    def close(self) -> None:
        self.manager.stop(block=True)


class StreamedText:
    """Generated tokens -> the text to send next: whole characters only, and nothing that may turn out to
    be the start of a stop string; the text ends before a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = 0

    def update(self, tokens: list[int], done: bool) -> tuple[str, bool]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            return self._take(text, cut), True
        if done:
            return self._take(text, len(text)), False
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":  # a character still being decoded
            end -= 1
        return self._take(text, end), False

    def _take(self, text: str, end: int) -> str:
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece
