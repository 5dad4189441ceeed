"""Deterministic Differentiable Pruning (arXiv 2603.08065), as the project implements it (docs/methods.md, DDP)."""
