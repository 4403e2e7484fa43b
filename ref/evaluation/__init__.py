"""Evaluation: multiple choice, toxicity with fluency, perplexity, scorers, sampling."""
