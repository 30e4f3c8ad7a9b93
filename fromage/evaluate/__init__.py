"""Evaluation: the paper's benchmarks and the offline benchmark."""
