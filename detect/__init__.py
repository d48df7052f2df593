"""Measuring memorization: noise magnitude, trigger tokens, neurons, copy similarity."""

from hf_datasets.quiet import quiet_third_party

quiet_third_party()
