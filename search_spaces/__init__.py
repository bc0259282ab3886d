"""Encodings of training orders and curriculum families for Optuna."""
