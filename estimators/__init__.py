"""Surrogates that map training orders to estimated losses (see estimators/base.py)."""
