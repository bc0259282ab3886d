"""Command-line interface: ``currsearch COMMAND [CONFIG] [options]``.

Every command takes an optional TOML/YAML config file (defaults run on the embedded
corpus) and ``--set section.key=value`` overrides. Errors on bad input print one clear
``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Config, config_from_dict, load_config
from .errors import ConfigError, CurrsearchError


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_config(path: str | None, overrides: list[str]) -> Config:
    """Load ``path`` (or defaults) and apply ``section.key=value`` overrides (values parsed as JSON when they parse).

    Raises:
        ConfigError: a malformed override or an invalid resulting config.
    """
    d = load_config(path).to_dict()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. data.num_batches=16")
        section, name = parts
        if section not in d:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; sections are {sorted(d)}")
        d[section][name] = _parse_value(value)
    return config_from_dict(d, source=f"{path or 'defaults'} with --set overrides")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML or YAML config file (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_train(args) -> int:
    import torch
    from safetensors.torch import save_file

    from .orders import parse_order, save_order
    from .train import Trainer

    cfg = resolve_config(args.config, args.set)
    trainer = Trainer.from_config(cfg)
    order = parse_order(args.order, trainer.T)
    res = trainer.train(order, progress=not args.quiet)
    print(f"trained {trainer.model.num_params:,} parameters on T={trainer.T} batches in order {args.order!r} "
          f"({res.seconds:.2f} s for the window)")
    print(f"{'eval set':<12} {'loss (nats/token)':>18} {'perplexity':>11}")
    for name, loss in res.eval_dict().items():
        print(f"{name:<12} {loss:>18.4f} {res.perplexity()[name]:>11.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({**res.summary(), "config": cfg.to_dict()}, indent=1))
        save_order(out / "order.json", order)
        params = {k: v.detach().contiguous().clone() for k, v in trainer.model.unflatten(res.theta).items()}
        save_file(params, str(out / "model.safetensors"))
        print(f"wrote {out}/result.json, order.json, model.safetensors")
    return 0


def cmd_record(args) -> int:
    from .record import record

    cfg = resolve_config(args.config, args.set)
    store = record(cfg, args.out, progress=not args.quiet, check_budget=not args.no_budget)
    print(store.summary())
    return 0


def cmd_inspect(args) -> int:
    from .store import TrajectoryStore

    store = TrajectoryStore.open(args.store, verify=not args.no_verify, allow_incomplete=True)
    print(store.summary() if store.manifest["phase"] == "complete" else
          f"incomplete store {store.path} (phase {store.manifest['phase']}, "
          f"{len(store.manifest['checkpoints_done'])} checkpoints, {len(store.manifest['pairs_done'])} of "
          f"{len(store.anchors)} pair shards done); run `currsearch record` again to resume")
    return 0


def cmd_benchmark(args) -> int:
    from .fidelity_cli import main as fidelity_main

    return {"fidelity": fidelity_main}[args.name](args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="currsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the model on one order of the plan's batches")
    _add_common(p)
    p.add_argument("--order", default="reference", help="'reference', 'random:SEED' or a JSON file (default: reference)")
    p.add_argument("--out", help="directory for result.json, order.json and model.safetensors")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("record", help="record the reference trajectory store (resumes an interrupted one)")
    _add_common(p)
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--no-budget", action="store_true", help="record even if an estimate exceeds record.max_*")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("inspect", help="print a summary of a trajectory store")
    p.add_argument("store", help="store directory")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of every file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("benchmark", help="run a benchmark against real retraining (fidelity)", add_help=False)
    p.add_argument("name", choices=["fidelity"], help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (see --help after the name)")
    p.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``currsearch`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
