"""Evaluation: retrieval, zero-shot classification, multilingual retrieval."""
