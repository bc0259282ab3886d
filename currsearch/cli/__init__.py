"""Command-line interface: ``currsearch COMMAND [CONFIG] [options]``.

Every command takes an optional TOML/YAML config file (defaults run on the embedded
corpus) and ``--set section.key=value`` overrides. Each command group lives in its own
module (``train``: train/record/inspect; ``search``: search; ``run``: the main job;
``benchmark``, ``analyze``, ``ablate``); handlers parse arguments into typed settings, call
the library and print. Errors on bad input print one clear ``error:`` line and exit with
status 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from ..errors import CurrsearchError
from ..manifest import check_output_dir
from . import ablate, analyze, benchmark, run, search, train
from .common import csv_list, progress_logging, resolve_config  # noqa: F401  (csv_list, resolve_config: used by the benchmarks)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line and exit status 2 (argparse's own
    convention), raised as an exception so :func:`main` returns instead of exiting."""

    def error(self, message: str):
        raise CurrsearchError(f"{self.prog}: {message} (see --help)")


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """The ``currsearch`` parser with every command's subparser, built once per process (6-17 ms
    per build; parsing does not change it, so repeated :func:`main` calls share it)."""
    parser = _Parser(prog="currsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (train, search, run, benchmark, analyze, ablate):
        module.register(sub)
    return parser


#: argument names (argparse ``dest``) that name an output directory a command creates or writes in
OUTPUT_DIR_OPTIONS = ("out", "store_dir")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``currsearch`` command; returns the exit status (0, or 2 after one ``error:`` line)."""
    try:
        args = build_parser().parse_args(argv)
        for option in OUTPUT_DIR_OPTIONS:
            check_output_dir(getattr(args, option, None), "--" + option.replace("_", "-"))
        with progress_logging(getattr(args, "quiet", False)):
            return args.func(args)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
