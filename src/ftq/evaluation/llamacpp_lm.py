"""lm-eval's model interface over ftq's llama.cpp runtime, in process: what lets every lm-eval task score
a GGUF build exactly as the runtime evaluates it, with no server in between.

Log-likelihoods come from llama.cpp's own logits, not from a completion API's echo logprobs. Requests
that share a context (a multiple choice item's endings: HellaSwag's four) are scored together: the
context enters llama.cpp's batch once, shared by one sequence per continuation, and several items go
into one decode (SharedPrefixBatch, as llama.cpp's own `llama-perplexity --hellaswag` batches them),
so an item costs its context plus its endings instead of four times both."""

from __future__ import annotations

from itertools import groupby

import numpy as np
from lm_eval.api.model import TemplateLM


def continuation_score(logits: np.ndarray, continuation: list[int]) -> tuple[float, bool]:
    """(summed log-probability of `continuation`, whether each of its tokens is the argmax) from the
    logits that predict its tokens ([len(continuation), vocab]). Only the targets' log-probabilities are
    formed (logit - logsumexp): exponentials in float32, as llama.cpp's own scorer takes them, summed in
    float64; a full float64 log-softmax of every row was a large share of a GGUF candidate's HellaSwag time."""
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(continuation)
    peak = logits.max(axis=1)
    total = np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64)
    chosen = logits[np.arange(len(targets)), targets].astype(np.float64)
    logprob = float((chosen - peak - np.log(total)).sum())
    return logprob, bool((logits.argmax(axis=1) == targets).all())


class SharedPrefixBatch:
    """A llama.cpp context of its own for scoring several items per decode, the way llama.cpp's
    `llama-perplexity --hellaswag` does: each item's context enters the batch once, as a token of every
    one of its continuations' sequences, and each continuation follows in a sequence of its own. One
    decode then scores up to `capacity` tokens of several items, where one decode per continuation
    leaves a CPU's matrix units mostly idle."""

    # 1024 tokens / 8 sequences (two HellaSwag items per decode): 64 items 40.8 s (median of 3) against
    # 45.8 s at 2048 / 32 on 2 cores, where every token of a unified cache attends over the whole batch
    def __init__(self, llama, capacity: int = 1024, max_sequences: int = 8):
        import llama_cpp
        from llama_cpp import _internals

        self.capacity, self.max_sequences = capacity, max_sequences
        params = llama_cpp.llama_context_default_params()
        for field in ("n_threads", "n_threads_batch", "type_k", "type_v", "flash_attn_type"):
            if hasattr(llama.context_params, field):
                setattr(params, field, getattr(llama.context_params, field))
        params.n_ctx = params.n_batch = capacity
        params.n_ubatch = min(512, capacity)
        params.n_seq_max = max_sequences
        params.kv_unified = True  # a context token shared by the sequences of its continuations
        self.context = _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        self.batch = llama_cpp.llama_batch_init(capacity, 0, max_sequences)
        self.vocab = llama.n_vocab()

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(self.batch)
        self.context.close()

    @staticmethod
    def tokens(context: list[int], continuations: list[list[int]]) -> int:
        return len(context) + sum(len(c) - 1 for c in continuations)

    def score(self, items: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """Items (a context and its continuations) that fit together (tokens() summed <= capacity,
        continuations <= max_sequences): every continuation's (log-probability, greedy)."""
        import llama_cpp

        batch, n, rows = self.batch, 0, []  # rows: per item, (context's last index, [each continuation's indices])

        def add(token: int, position: int, sequences: list[int], output: bool) -> int:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, position, len(sequences), output
            for j, sequence in enumerate(sequences):
                batch.seq_id[n][j] = sequence
            n += 1
            return n - 1

        sequence = 0
        for context, continuations in items:
            own = list(range(sequence, sequence + len(continuations)))
            sequence += len(continuations)
            last = [add(t, p, own, p == len(context) - 1) for p, t in enumerate(context)][-1]
            rows.append((last, [[add(t, len(context) + p, [s], True) for p, t in enumerate(c[:-1])]
                                for s, c in zip(own, continuations)]))
        batch.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.context.ctx), True)
        if llama_cpp.llama_decode(self.context.ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on a batch of {n} tokens")

        def logits(index: int) -> np.ndarray:
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.context.ctx, index), shape=(self.vocab,))

        scores = []
        for (context, continuations), (last, indices) in zip(items, rows):
            first = logits(last)
            scores.append([continuation_score(np.stack([first, *(logits(i) for i in idx)]), c)
                           for c, idx in zip(continuations, indices)])
        return scores


class LlamaCppLM(TemplateLM):
    def __init__(self, runtime, max_length: int, max_gen_toks: int):
        super().__init__()
        self.runtime = runtime
        self._max_length = min(int(max_length), runtime.context_length - 1)
        self.max_gen_toks = int(max_gen_toks)
        self._batcher: SharedPrefixBatch | None = None

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
        groups = [(list(context), list(group)) for context, group in groupby(fitted, key=lambda r: r[0])]
        batcher = self._shared_batch()
        pending: list = []

        def flush() -> None:
            scored = batcher.score([(context, [m[1] for m in members]) for context, members in pending])
            for (_, members), scores in zip(pending, scored):
                for (_, _, index), score in zip(members, scores):
                    results[index] = score
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
            pending.clear()

        for context, members in groups:
            need = SharedPrefixBatch.tokens(context, [m[1] for m in members])
            if need > batcher.capacity or len(members) > batcher.max_sequences:  # alone, the slow way
                for (_, _, index), score in zip(members, self._score_group(context, [m[1] for m in members])):
                    results[index] = score
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
                continue
            if pending and (sum(SharedPrefixBatch.tokens(c, [m[1] for m in ms]) for c, ms in pending) + need
                            > batcher.capacity or sum(len(ms) for _, ms in pending) + len(members) > batcher.max_sequences):
                flush()
            pending.append((context, members))
        if pending:
            flush()
        return results  # type: ignore[return-value]

    def _shared_batch(self) -> SharedPrefixBatch:
        if self._batcher is None:
            self._batcher = SharedPrefixBatch(self.runtime.llama)  # the loaded model; a context of its own
        return self._batcher

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

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
