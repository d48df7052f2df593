"""Measuring memorization: noise magnitude, trigger tokens, neurons, copy similarity."""
