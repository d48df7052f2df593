"""Reducing memorization: embedding adjustment, neuron deactivation, training-time filtering."""
