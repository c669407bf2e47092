"""Evaluation: base vs finetuned on a prompt set, scored by the scoring stage's scorers."""
