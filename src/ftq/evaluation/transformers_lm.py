"""lm-eval's `hf` model, with the requests that share a context scored together: the context once, then
its continuations as one batch from the context's KV cache (a multiple-choice item's endings: HellaSwag's
four). lm-eval's own HFLM scores every context + continuation from scratch, which on a CPU costs an item
about twice the tokens. Everything else (generation, rolling log-likelihoods, requests with a context of
their own) is lm-eval's HFLM unchanged."""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.models.huggingface import HFLM


class SharedContextHFLM(HFLM):
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, (_, context, _) in enumerate(requests):
            groups[tuple(context)].append(index)
        results: list = [None] * len(requests)
        alone = [i for members in groups.values() if len(members) == 1 for i in members]
        if alone:
            scored = super()._loglikelihood_tokens([requests[i] for i in alone], disable_tqdm, override_bs)
            for index, score in zip(alone, scored):
                results[index] = score
        for context, members in groups.items():
            if len(members) < 2:
                continue
            for index, score in zip(members, self._score_group(list(context), [list(requests[i][2]) for i in members])):
                results[index] = score
                self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
        return results

    @torch.no_grad()
    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy) of each continuation after `context`; the context is cut from
        the left as HFLM cuts it, so that context + the longest continuation fits max_length + 1."""
        longest = max(len(c) for c in continuations)
        context = context[-max(1, self.max_length + 1 - longest):]
        out = self.model(input_ids=torch.tensor([context], device=self.device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each continuation's first token
        rest = None
        if longest > 1:
            count, width = len(continuations), longest - 1
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.full((count, width), pad, dtype=torch.long)
            mask = torch.zeros((count, len(context) + width), dtype=torch.long)
            mask[:, :len(context)] = 1
            for row, continuation in enumerate(continuations):
                ids[row, :len(continuation) - 1] = torch.tensor(continuation[:-1])
                mask[row, len(context):len(context) + len(continuation) - 1] = 1
            cache = out.past_key_values
            cache.batch_repeat_interleave(count)
            positions = torch.arange(len(context), len(context) + width).unsqueeze(0).expand(count, -1)
            rest = torch.log_softmax(self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                                position_ids=positions.to(self.device), past_key_values=cache,
                                                use_cache=False).logits.float(), dim=-1)
        scores = []
        for row, continuation in enumerate(continuations):
            steps = [first] + ([rest[row, t] for t in range(len(continuation) - 1)] if rest is not None else [])
            targets = torch.tensor(continuation, device=first.device)
            logprobs = torch.stack(steps)
            picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
            scores.append((float(picked.sum()), bool((logprobs.argmax(dim=-1) == targets).all())))
        return scores
