"""Shared pieces of the command-line interface: config resolution, option parsers, output.

The CLI only parses arguments into typed settings, calls the library and prints; every
handler returns an exit status. Errors on bad input print one ``error:`` line and exit 2
(:func:`currsearch.cli.main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from ..config import Config, config_from_dict, load_config
from ..errors import ConfigError


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_config(path: str | None, overrides: list[str], base: Config | None = None) -> Config:
    """Load ``path`` (or ``base`` when no path is given, else the defaults) and apply
    ``section.key=value`` overrides (values parsed as JSON when they parse).

    Raises:
        ConfigError: a malformed override or an invalid resulting config.
    """
    d = (base if base is not None and path is None else load_config(path)).to_dict()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. data.num_batches=16")
        section, name = parts
        if section not in d:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; sections are {sorted(d)}")
        d[section][name] = _parse_value(value)
    origin = path or ("the store's config" if base is not None else "defaults")
    return config_from_dict(d, source=f"{origin} with --set overrides")


def csv_list(text: str) -> list[str]:
    """Parse a comma-separated option value (``"a, b,"`` -> ``["a", "b"]``); argparse ``type=``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def add_config_options(p: argparse.ArgumentParser, config_help: str = "TOML or YAML config file (default: built-in defaults)") -> None:
    """The positional config file, ``--set`` overrides and ``--quiet``, shared by every command that trains."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def given(args: argparse.Namespace, *names: str) -> dict:
    """``{name: value}`` of the options among ``names`` that were given on the command line
    (argparse default ``None``), so the settings models keep the single source of defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def print_table(header: list[str], rows: list[list]) -> None:
    """Print an aligned plain-text table: strings left-aligned, numbers right-aligned with 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    num = [bool(rows) and isinstance(rows[0][i], float) for i in range(len(header))]
    line = lambda r: " ".join(f"{c:>{w}}" if n else f"{c:<{w}}" for c, w, n in zip(r, widths, num))  # noqa: E731
    print(line(header))
    for r in cells:
        print(line(r))


#: loggers of the project's packages (progress lines at INFO)
LOGGERS = ("currsearch", "estimators", "search_spaces")


@contextlib.contextmanager
def progress_logging(quiet: bool):
    """Show the project's INFO progress lines on stderr for one command (nothing with
    ``quiet``); the loggers' levels and handlers are restored afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = []
    for name in LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, log.level))
        log.setLevel(logging.WARNING if quiet else logging.INFO)
        log.addHandler(handler)
    try:
        yield
    finally:
        for log, level in saved:
            log.removeHandler(handler)
            log.setLevel(level)
