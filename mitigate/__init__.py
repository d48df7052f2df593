"""Reducing memorization: embedding adjustment, neuron deactivation, training-time filtering."""

from hf_datasets.quiet import quiet_third_party

quiet_third_party()
