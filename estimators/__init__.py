"""Surrogates that map training orders to estimated eval losses.

Use ``get_estimator(name).fit(store).estimate(orders)``; ``available()`` lists the names.
See ``estimators/base.py`` for the contract and each module for its math and source.
"""

from . import calibrated, fut, hvp, hybrid, response, simple  # noqa: F401  (register the built-in estimators)
from .base import Estimator, available, get_estimator, register  # noqa: F401
