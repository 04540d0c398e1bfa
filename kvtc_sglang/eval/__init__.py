"""Evaluation of the codec against the uncompressed cache and plain baselines."""
