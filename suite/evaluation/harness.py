"""lm-eval's HF model with shared-context scoring: each distinct context runs once, its candidates reuse its cache.

Multiple-choice tasks score k continuations of one context; the stock HFLM feeds context + continuation k times,
so on the embedded tasks (about 100 context tokens, about 10 per candidate) most of the compute is the same context
again. Here a batch of distinct contexts is run once with the KV cache on, the cache rows are repeated for each
candidate, and only the candidates' tokens are run on top. The log-likelihoods are the stock ones up to float
rounding (a test compares both paths); requests that do not fit the model's window, and non-causal models, take
the stock path with its left truncation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

Request = tuple[tuple[str, str], list[int], list[int]]


class SharedContextLM(HFLM):
    """HFLM whose causal log-likelihoods run each distinct context once (see the module docstring)."""

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # one lm-eval bar per task inside the runner's own bar is noise; the runner reports progress per run
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        stock = [i for i, (_, ctx, cont) in enumerate(requests) if len(ctx) + len(cont) > self.max_length + 1]
        if stock:
            done = super()._loglikelihood_tokens([requests[i] for i in stock], disable_tqdm, override_bs)
            for i, answer in zip(stock, done, strict=True):
                out[i] = answer
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _cont) in enumerate(requests):
            if out[i] is None:
                groups.setdefault(tuple(ctx), []).append(i)
        # contexts of one token have no prefix to cache; batched apart so no cache row is all padding
        contexts = sorted(groups, key=len, reverse=True)
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 16)
        for kind in (True, False):
            chosen = [c for c in contexts if (len(c) > 1) == kind]
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start : start + batch_size]
                rows = [(b, i) for b, ctx in enumerate(batch) for i in groups[ctx]]
                scores = self._score(batch, [requests[i][2] for _, i in rows], [b for b, _ in rows])
                for (_, i), answer in zip(rows, scores, strict=True):
                    out[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _score(self, contexts: list[tuple[int, ...]], continuations: list[list[int]],
               owner: list[int]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether it is the greedy one, for each (owner, continuation)."""
        device, rows = self.device, len(continuations)
        owner_t = torch.tensor(owner, device=device)
        prefix_len = torch.tensor([len(c) - 1 for c in contexts], device=device)
        width = int(prefix_len.max())
        kwargs: dict[str, Any] = {}
        prefix_mask = torch.zeros(len(contexts), width, dtype=torch.long, device=device)
        if width:
            # right padding: every padded slot follows a real token, so no query row is fully masked
            ids = torch.zeros(len(contexts), width, dtype=torch.long, device=device)
            for b, ctx in enumerate(contexts):
                ids[b, : len(ctx) - 1] = torch.tensor(ctx[:-1], device=device)
                prefix_mask[b, : len(ctx) - 1] = 1
            cache = self.model(ids, attention_mask=prefix_mask, use_cache=True).past_key_values
            cache.batch_select_indices(owner_t)
            kwargs["past_key_values"] = cache
        # the candidates' inputs: the context's last token, then the continuation but its last token
        steps = max(len(c) for c in continuations)
        ids = torch.zeros(rows, steps, dtype=torch.long, device=device)
        targets = torch.zeros(rows, steps, dtype=torch.long, device=device)
        mask = torch.zeros(rows, steps, dtype=torch.long, device=device)
        for r, (b, cont) in enumerate(zip(owner, continuations, strict=True)):
            ids[r, : len(cont)] = torch.tensor([contexts[b][-1], *cont[:-1]], device=device)
            targets[r, : len(cont)] = torch.tensor(cont, device=device)
            mask[r, : len(cont)] = 1
        positions = prefix_len[owner_t, None] + torch.arange(steps, device=device)
        logits = self.model(ids, attention_mask=torch.cat([prefix_mask[owner_t], mask], dim=1),
                            position_ids=positions, use_cache=bool(width), **kwargs).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, targets[..., None])[..., 0] * mask
        greedy = (logprobs.argmax(-1) == targets) | (mask == 0)
        return [(float(picked[r].sum()), bool(greedy[r].all())) for r in range(rows)]
