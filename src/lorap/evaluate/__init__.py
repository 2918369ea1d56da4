"""Evaluation: perplexity (and, later, zero-shot and efficiency)."""
