"""lm-eval's `hf` model, with the requests that share a context scored together and without padding:
each context once, then its continuations (a multiple-choice item's endings: HellaSwag's four), several
items packed into one row under an attention mask that keeps continuations and items apart, the LM head
run only where a log-probability is read. lm-eval's own HFLM scores every context + continuation from
scratch, which costs an item about twice the tokens; a padded batch of continuations from the context's
KV cache (this module's first design) still spent many of HellaSwag's tokens on padding, compute a CPU
pays in full. Everything else (generation, rolling log-likelihoods, requests with a context of their own)
is lm-eval's HFLM unchanged."""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.models.huggingface import HFLM


class SharedContextHFLM(HFLM):
    items_per_batch = 64  # groups handed to _score_groups at once (it packs them into rows)
    row_tokens = 384  # tokens per forward pass: dense-masked attention over a row costs ~10 % of its matmuls here

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
        """(summed log-probability, greedy) of each continuation after its context, with no padding: the
        groups packed into rows of about `row_tokens`, each group laid out as its context then every
        continuation (less its last token), under a mask that lets a continuation see its context and
        itself, never another continuation or group; the LM head runs only where a log-probability is
        read. A context is cut from the left as HFLM cuts it, so that it and its longest continuation fit
        max_length + 1."""
        laid = [self._layout(context, conts) for context, conts in groups]
        scores: list[list[tuple[float, bool]]] = []
        row: list = []
        for group in laid:
            if row and sum(len(g["ids"]) for g in row) + len(group["ids"]) > self.row_tokens:
                scores += self._score_row(row)
                row = []
            row.append(group)
        return scores + (self._score_row(row) if row else [])

    def _layout(self, context: list[int], conts: list[list[int]]) -> dict:
        context = context[-max(1, self.max_length + 1 - max(len(x) for x in conts)):]
        ids, positions, segments, reads = list(context), list(range(len(context))), [-1] * len(context), []
        for k, continuation in enumerate(conts):
            start = len(ids)
            # log-probability of continuation[t] is read at the position before it: the context's last
            # token for t = 0, else continuation[t - 1]'s, which sits at start + t - 1
            reads.append([len(context) - 1] + [start + t - 1 for t in range(1, len(continuation))])
            ids += continuation[:-1]
            positions += range(len(context), len(context) + len(continuation) - 1)
            segments += [k] * (len(continuation) - 1)
        return {"ids": ids, "positions": positions, "segments": segments, "reads": reads, "conts": conts}

    def _score_row(self, row: list[dict]) -> list[list[tuple[float, bool]]]:
        ids = torch.tensor([t for g in row for t in g["ids"]])
        positions = torch.tensor([p for g in row for p in g["positions"]])
        segments = torch.tensor([s for g in row for s in g["segments"]])
        owner = torch.tensor([n for n, g in enumerate(row) for _ in g["ids"]])
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        visible = causal & (owner[:, None] == owner[None, :]) & (
            (segments[None, :] == -1) | (segments[:, None] == segments[None, :]))
        offsets = [0]
        for g in row:
            offsets.append(offsets[-1] + len(g["ids"]))
        reads = sorted({offsets[n] + r for n, g in enumerate(row) for cont in g["reads"] for r in cont})
        at = {r: i for i, r in enumerate(reads)}
        logits = self.model(input_ids=ids[None].to(self.device), position_ids=positions[None].to(self.device),
                            attention_mask=visible[None, None].to(self.device), use_cache=False,
                            logits_to_keep=torch.tensor(reads, device=self.device)).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for n, g in enumerate(row):
            group = []
            for read, continuation in zip(g["reads"], g["conts"]):
                steps = logprobs[[at[offsets[n] + r] for r in read]]
                targets = torch.tensor(continuation, device=steps.device)
                picked = steps.gather(1, targets.unsqueeze(1)).squeeze(1)
                group.append((float(picked.sum()), bool((steps.argmax(dim=-1) == targets).all())))
            scores.append(group)
        return scores
