"""Evaluation pieces used by the `evaluate` stage: task metrics on held-out data, efficiency."""
