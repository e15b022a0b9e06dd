"""lm-eval's `hf` model, with the requests that share a context scored together: the context once, then
its continuations from the context's KV cache (a multiple-choice item's endings: HellaSwag's four),
several items per forward pass. lm-eval's own HFLM scores every context + continuation from scratch, which on a CPU costs an item
about twice the tokens. Everything else (generation, rolling log-likelihoods, requests with a context of
their own) is lm-eval's HFLM unchanged."""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.models.huggingface import HFLM


class SharedContextHFLM(HFLM):
    items_per_batch = 8  # contexts per forward pass; their continuations (HellaSwag: 32) form the second

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
        shared = [(list(context), members) for context, members in groups.items() if len(members) > 1]
        for start in range(0, len(shared), self.items_per_batch):
            chunk = shared[start:start + self.items_per_batch]
            scored = self._score_groups([(context, [list(requests[i][2]) for i in members]) for context, members in chunk])
            for (_, members), scores in zip(chunk, scored):
                for index, score in zip(members, scores):
                    results[index] = score
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
        return results

    @torch.no_grad()
    def _score_groups(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """(summed log-probability, greedy) of each continuation after its context: the contexts (left-
        padded) in one forward pass, then every continuation in a second from its context's KV cache.
        A context is cut from the left as HFLM cuts it, so that it and its longest continuation fit
        max_length + 1."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        contexts = [c[-max(1, self.max_length + 1 - max(len(x) for x in conts)):] for c, conts in groups]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(groups), width), pad, dtype=torch.long)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = torch.tensor(context)
            mask[row, width - len(context):] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(self.device), use_cache=True)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
        rows = [(g, continuation) for g, (_, conts) in enumerate(groups) for continuation in conts]
        longest = max(len(c) for _, c in rows) - 1
        rest = None
        if longest > 0:
            ids2 = torch.full((len(rows), longest), pad, dtype=torch.long)
            mask2 = torch.zeros((len(rows), longest), dtype=torch.long)
            for row, (_, continuation) in enumerate(rows):
                ids2[row, :len(continuation) - 1] = torch.tensor(continuation[:-1])
                mask2[row, :len(continuation) - 1] = 1
            index = torch.tensor([g for g, _ in rows], device=self.device)
            cache = out.past_key_values
            cache.reorder_cache(index)  # each continuation's row: a copy of its context's cache
            starts = torch.tensor([len(contexts[g]) for g, _ in rows]).unsqueeze(1)
            rest = torch.log_softmax(self.model(
                input_ids=ids2.to(self.device), attention_mask=torch.cat([mask[index.cpu()], mask2], 1).to(self.device),
                position_ids=(starts + torch.arange(longest)).to(self.device), past_key_values=cache,
                use_cache=False).logits.float(), dim=-1)
        scores: list[list[tuple[float, bool]]] = [[] for _ in groups]
        for row, (g, continuation) in enumerate(rows):
            steps = torch.stack([first[g], *(rest[row, t] for t in range(len(continuation) - 1))])
            targets = torch.tensor(continuation, device=steps.device)
            picked = steps.gather(1, targets.unsqueeze(1)).squeeze(1)
            scores[g].append((float(picked.sum()), bool((steps.argmax(dim=-1) == targets).all())))
        return scores
