"""The prunebench command line: the one place that composes suite (pruning, evaluation, orchestration) with
reports, so neither imports the other."""
