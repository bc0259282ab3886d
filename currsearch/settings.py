"""Base class of the typed job settings (search, trust region, pipeline).

Each job takes one pydantic model of its settings, the single source of its defaults: the
CLI passes only the options a user gave, the library fills in the rest. Invalid values raise
:class:`~currsearch.errors.ConfigError` at construction (and in a ``model_copy`` with an update),
before a job creates any file.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

_S = TypeVar("_S", bound="Settings")


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming each invalid field, what it needs and what it got (for ``error:`` output)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key; remove it or check its spelling")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})"[:300])
    return f"invalid {source}: " + "; ".join(parts)


class Settings(BaseModel):
    """Frozen pydantic model with unknown keys rejected; errors as one :class:`ConfigError`.

    Raises:
        ConfigError: (on construction) an unknown key or an invalid value, naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as err:
            words = re.findall(r"[A-Z][a-z]*", type(self).__name__.removesuffix("Settings"))
            raise ConfigError(format_validation_error(err, "-".join(words).lower() + " settings")) from None

    def model_copy(self: _S, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> _S:
        """A copy with ``update`` applied, built and validated as a new instance from the
        fields given to this one plus ``update`` (pydantic's own ``model_copy`` skips validation,
        so an update could carry an invalid value into a job; defaults and values derived by
        validators are derived again).

        Raises:
            ConfigError: an updated value is invalid or not a field of these settings.
        """
        copy = super().model_copy(deep=deep)
        if not update:
            return copy
        return type(self)(**{**{k: getattr(copy, k) for k in copy.model_fields_set}, **update})
