"""lm-eval's model interface over ftq's llama.cpp runtime, in process: what lets every lm-eval task score
a GGUF build exactly as the runtime evaluates it, with no server in between.

Log-likelihoods come from llama.cpp's own logits (ftq.runtimes.llamacpp decodes token ids and reads
them per batch), not from a completion API's echo logprobs. Requests that share a context (a multiple
choice item's endings: HellaSwag's four) are scored together: the context is evaluated once and each
continuation is decoded after it from the KV cache, so an item costs its context plus its endings
instead of four times both."""

from __future__ import annotations

from itertools import groupby

import numpy as np
from lm_eval.api.model import TemplateLM


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def continuation_score(logits: np.ndarray, continuation: list[int]) -> tuple[float, bool]:
    """(summed log-probability of `continuation`, whether each of its tokens is the argmax) from the
    logits that predict its tokens ([len(continuation), vocab])."""
    logprobs = _log_softmax(logits)
    targets = np.asarray(continuation)
    rows = np.arange(len(targets))
    return float(logprobs[rows, targets].sum()), bool((logprobs.argmax(axis=1) == targets).all())


class LlamaCppLM(TemplateLM):
    def __init__(self, runtime, max_length: int, max_gen_toks: int):
        super().__init__()
        self.runtime = runtime
        self._max_length = min(int(max_length), runtime.context_length - 1)
        self.max_gen_toks = int(max_gen_toks)

    # --- tokens ----------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.runtime.llama.token_eos())

    @property
    def prefix_token_id(self) -> int:
        """What a rolling window or an empty context starts from: BOS where the vocabulary has one, else
        the end-of-text token, as lm-eval's hf model does (so both runtimes score the same tokens)."""
        bos = self.runtime.llama.metadata.get("tokenizer.ggml.bos_token_id")
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.runtime.tokenize(string, add_special=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.runtime.detokenize(tokens)

    # --- chat template (ftq's own tasks run with the candidate's template) -------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.runtime.path.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.runtime.tokenizer_info()["chat_template"] if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.runtime._template_renderer()(chat_history, None, add_generation_prompt)

    # --- scoring ---------------------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation fits max_length (as lm-eval's
        HF model does); at least one context token stays to predict the continuation's first token."""
        room = max(1, self.max_length - len(continuation))
        return context[-room:]

    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """The context once, then each continuation after it (the context's KV cache is kept: _decode
        drops only what lies past n_past)."""
        last = list(self.runtime._decode(context, n_past=0))[-1][-1:]  # logits predicting continuation[0]
        scores = []
        for continuation in continuations:
            rows = [last]
            if len(continuation) > 1:
                rows += list(self.runtime._decode(continuation[:-1], n_past=len(context)))
            scores.append(continuation_score(np.concatenate(rows), continuation))
        return scores

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        fitted = []
        for index, (_, context, continuation) in enumerate(requests):
            if len(continuation) >= self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length "
                                 f"{self.max_length} (evaluate.lm_eval.max_length)")
            fitted.append((tuple(self._fit(list(context), list(continuation))), list(continuation), index))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        fitted.sort(key=lambda r: (r[0], r[2]))
        for context, group in groupby(fitted, key=lambda r: r[0]):
            members = list(group)
            for (_, _, index), score in zip(members, self._score_group(list(context), [m[1] for m in members])):
                results[index] = score
                self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (string,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, list(c), list(t)) for c, t in windows])
            total = sum(score for score, _ in scores)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy: ftq's generation tasks compare answers, and a sampled answer would differ per run."""
        answers = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            reply = self.runtime.llama.create_completion(context, max_tokens=max_tokens, temperature=0.0, seed=0,
                                                         stop=until or None)
            text = reply["choices"][0]["text"] or ""
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return answers
