"""Measuring memorization: noise magnitude, trigger tokens, memorization neurons, copy similarity."""
