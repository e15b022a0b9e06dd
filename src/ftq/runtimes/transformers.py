"""The transformers runtime: plain HF folders and the quantized formats transformers loads itself
(compressed-tensors from llm-compressor's AWQ, GPTQ through GPTQModel's kernels)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch


class TransformersRuntime:
    kind = "transformers"

    def __init__(self, path: Path, threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype="auto", device_map=self.device)
        self.model.eval()

    def _inputs(self, messages: list[dict]) -> dict:
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def _generation_kwargs(self, max_new_tokens: int, temperature: float) -> dict:
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.no_grad()
    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
        inputs = self._inputs(messages)
        output = self.model.generate(**inputs, **self._generation_kwargs(max_new_tokens, temperature))
        return self.tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **self._generation_kwargs(max_new_tokens, temperature), "streamer": streamer}
        worker = threading.Thread(target=lambda: torch.no_grad()(self.model.generate)(**kwargs), daemon=True)
        worker.start()
        yield from (text for text in streamer if text)
        worker.join()

    @torch.no_grad()
    def sequence_nll(self, token_ids: list[int]) -> tuple[float, int]:
        ids = torch.tensor([token_ids], device=self.model.device)
        logits = self.model(input_ids=ids, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
        nll = -logprobs.gather(1, ids[0, 1:].unsqueeze(1)).sum()
        return float(nll), len(token_ids) - 1

    def close(self) -> None:
        self.model = None
