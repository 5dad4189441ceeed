"""Deterministic Differentiable Pruning (arXiv 2603.08065), as the project implements it (METHODS.md A2)."""
