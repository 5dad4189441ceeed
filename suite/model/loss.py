"""Next-token negative log-likelihood, written once: perplexity, mask-learning losses, gradient capture, the tuning
objective and Týr's objective all score a causal LM with these."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_nll(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of each target token under the logits at its position ([B, T, V] against [B, T]), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def next_token_nll(logits: Tensor, ids: Tensor, reduction: str = "mean") -> Tensor:
    """The NLL of every next token of `ids` [B, T] under the model's `logits` [B, T, V] for them."""
    return token_nll(logits[:, :-1], ids[:, 1:], reduction)
