"""The transformers runtime: plain HF folders and the quantized formats transformers loads itself
(compressed-tensors from llm-compressor's AWQ, GPTQ through GPTQModel's kernels)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch


class TransformersRuntime:
    kind = "transformers"

    def __init__(self, path: Path, threads: int | None = None, dtype: str = "auto"):
        """`dtype` auto loads the weights as stored; a named dtype casts a plain HF folder's weights
        (quantized formats keep the dtype their kernels take)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from ftq.hf import load_kwargs

        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, **load_kwargs())
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, device_map=self.device,
                                                          **load_kwargs())
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.model.eval()

    def _inputs(self, messages: list[dict], tools: list[dict] | None = None) -> dict:
        inputs = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                           stop: list[str] | None = None) -> dict:
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        return kwargs

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))

    @torch.no_grad()
    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             tools: list[dict] | None = None) -> str:
        """`tools` are for a chat template that renders them itself (see ftq.data.tools)."""
        inputs = self._inputs(messages, tools)
        output = self.model.generate(**inputs, **self._generation_kwargs(max_new_tokens, temperature))
        return self.tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    @torch.no_grad()
    def chat_batch(self, conversations: list[list[dict]], max_new_tokens: int = 128) -> list[str]:
        """Greedy answers to several conversations in one generate call (left-padded, masked): what
        `chat` answers each, at a batch's cost. Token for token the same up to float rounding, which the
        tests check on the tiny model."""
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            inputs = self.tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                                        return_tensors="pt", return_dict=True)
        finally:
            self.tokenizer.padding_side = side
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        output = self.model.generate(**inputs, **self._generation_kwargs(max_new_tokens, 0.0))
        start = inputs["input_ids"].shape[1]
        return [self.tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in output]

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                    top_p: float = 1.0, stop: list[str] | None = None) -> Iterator[str]:
        yield from self._stream(self._inputs(messages), max_new_tokens, temperature, top_p, stop)

    def stream_text(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                    stop: list[str] | None = None) -> Iterator[str]:
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=True)
        yield from self._stream({k: v.to(self.model.device) for k, v in inputs.items()}, max_new_tokens, temperature,
                                top_p, stop)

    def _stream(self, inputs: dict, max_new_tokens: int, temperature: float, top_p: float, stop) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **self._generation_kwargs(max_new_tokens, temperature, top_p, stop), "streamer": streamer}
        worker = threading.Thread(target=lambda: torch.no_grad()(self.model.generate)(**kwargs), daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            if not piece:
                continue
            text += piece
            cut = _stop_index(text, stop)
            if cut is not None:  # generate stops at the stop string but the streamer still emits it
                piece = piece[: max(0, len(piece) - (len(text) - cut))]
                if piece:
                    yield piece
                break
            yield piece
        worker.join()

    @torch.no_grad()
    def timed_generation(self, messages: list[dict], tokens: int) -> dict:
        """Exactly `tokens` greedy tokens, the end of sequence ignored (min_new_tokens holds it back), so
        every candidate does the same work whatever it would answer: time to the first token (prefill
        included) and to the last, and the count of tokens generated, by the model's own ids."""
        import time

        inputs = self._inputs(messages)
        stamps = _Stamps()
        started = time.perf_counter()
        output = self.model.generate(**inputs, **self._generation_kwargs(tokens, 0.0), min_new_tokens=tokens,
                                     streamer=stamps)
        ended = time.perf_counter()
        generated = int(output.shape[1] - inputs["input_ids"].shape[1])
        return {"ttft_seconds": stamps.first - started, "decode_seconds": ended - stamps.first, "tokens": generated}

    # Token-level access, for the server's echo/logprobs completions (same interface as llama.cpp's).
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        return {int(t) for t in eos + [self.tokenizer.eos_token_id] if t is not None}

    def tokenizer_info(self) -> dict:
        return {"eos_token": self.tokenizer.eos_token, "bos_token": self.tokenizer.bos_token,
                "pad_token": self.tokenizer.pad_token, "chat_template": self.tokenizer.chat_template,
                "model_max_length": self.context_length, "vocab_size": self.model.config.vocab_size}

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @torch.no_grad()
    def logits(self, token_ids: list[int]):
        """Next-token logits after each prefix of `token_ids` ([n, vocab]); `next_logits` continues from here."""
        ids = torch.tensor([list(token_ids)], device=self.model.device)
        output = self.model(input_ids=ids, use_cache=True)
        self._past, self._length = output.past_key_values, len(token_ids)
        return output.logits[0].float().cpu().numpy()

    @torch.no_grad()
    def next_logits(self, token_id: int):
        ids = torch.tensor([[token_id]], device=self.model.device)
        output = self.model(input_ids=ids, past_key_values=self._past, use_cache=True)
        self._past, self._length = output.past_key_values, self._length + 1
        return output.logits[0, -1].float().cpu().numpy()

    @torch.no_grad()
    def sequence_nll(self, token_ids: list[int], scored: list[bool] | None = None) -> tuple[float, int]:
        ids = torch.tensor([token_ids], device=self.model.device)
        logits = self.model(input_ids=ids, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
        token_nll = -logprobs.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
        if scored is not None:
            keep = torch.tensor(scored[1:], device=token_nll.device)
            return float(token_nll[keep].sum()), int(keep.sum())
        return float(token_nll.sum()), len(token_ids) - 1

    def close(self) -> None:
        self.model = None


class _Stamps:
    """A generate() streamer that only notes when the first generated token came (put() gets the prompt
    first, then each new token)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        import time

        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _stop_index(text: str, stop: list[str] | None) -> int | None:
    found = [text.find(s) for s in stop or [] if s and s in text]
    return min(found) if found else None
