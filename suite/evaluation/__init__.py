"""Perplexity, tasks through lm-eval, speed: what a number in a table measures."""
