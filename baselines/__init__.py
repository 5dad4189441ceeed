"""Baseline pruning methods; each module registers its method with `suite.methods.pruner.register`."""
