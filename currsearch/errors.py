"""Exceptions raised by currsearch.

Every error raised on bad input is a subclass of :class:`CurrsearchError` (itself a
``ValueError``) and its message names what is wrong and how to fix it.
"""


class CurrsearchError(ValueError):
    """Base class of every user-facing currsearch error."""


class ConfigError(CurrsearchError):
    """An invalid configuration value, file or combination of values."""


class CorpusError(CurrsearchError):
    """A missing, empty or too small corpus, or an unreadable corpus file."""


class OrderError(CurrsearchError):
    """An order that is not a valid sequence of batch indices for the plan."""


class ModelError(CurrsearchError):
    """A model or tokenizer that cannot be built or loaded."""


class StoreError(CurrsearchError):
    """A trajectory store that is missing, corrupt, of another schema or mismatched."""


class BudgetError(CurrsearchError):
    """A job whose estimated time, memory or disk exceeds the configured budget."""


class BudgetTooSmallError(ConfigError):
    """A job's budget (``--budget``, real-run equivalents) is below what its settings need; the
    message names the minimum and its parts."""
