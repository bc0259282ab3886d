"""``currsearch train``, ``record`` and ``inspect``: one real training run, a recorded store, a store summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from ..orders import parse_order, save_order
from ..record import record
from ..reports.common import write_json
from ..store import TrajectoryStore
from ..train import Trainer
from .common import add_config_options, print_table, resolve_config


def cmd_train(args) -> int:
    """Train on one order; print per eval set the final loss (nats/token), its perplexity, the loss at
    the window start and the unigram-entropy baseline; optionally save the model."""
    cfg = resolve_config(args.config, args.set)
    order = parse_order(args.order, cfg.data.num_batches)  # before any work: a bad order costs nothing
    trainer = Trainer.from_config(cfg)
    res = trainer.train(order, progress=not args.quiet)
    start = trainer.evaluate(trainer.window_start().theta).tolist()
    base = trainer.unigram_baseline().tolist()
    print(f"trained {trainer.model.num_params:,} parameters on T={trainer.T} batches in order {args.order!r} "
          f"({res.seconds:.2f} s for the window)")
    ppl = res.perplexity()
    print_table(["eval set", "loss (nats/token)", "perplexity", "window start", "unigram baseline"],
                [[n, x, ppl[n], start[i], base[i]] for i, (n, x) in enumerate(res.eval_dict().items())])
    print("losses in nats/token; unigram baseline: cross-entropy under the add-one smoothed unigram "
          "distribution of the training tokens")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "result.json", {**res.summary(), "config": cfg.to_dict()})
        save_order(out / "order.json", order)
        params = {k: v.detach().cpu().contiguous().clone() for k, v in trainer.model.unflatten(res.theta).items()}
        save_file(params, str(out / "model.safetensors"))
        print(f"wrote {out}/result.json, order.json, model.safetensors")
    return 0


def cmd_record(args) -> int:
    """Record (or resume) the reference trajectory store."""
    store = record(resolve_config(args.config, args.set), args.out, progress=not args.quiet, check_budget=not args.no_budget)
    print(store.summary())
    return 0


def cmd_inspect(args) -> int:
    """Print a store's summary (an incomplete store: what is done and how to resume)."""
    store = TrajectoryStore.open(args.store, verify=not args.no_verify, allow_incomplete=True)
    m = store.manifest
    print(store.summary() if m["phase"] == "complete" else
          f"incomplete store {store.path} (phase {m['phase']}, {len(m['checkpoints_done'])} checkpoints, "
          f"{len(m['pairs_done'])} of {len(store.anchors)} pair shards done); run `currsearch record` again to resume")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``record`` and ``inspect`` commands."""
    p = sub.add_parser("train", help="train the model on one order of the plan's batches")
    add_config_options(p)
    p.add_argument("--order", default="reference", help="'reference', 'random:SEED' or a JSON file (default: reference)")
    p.add_argument("--out", help="directory for result.json, order.json and model.safetensors")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("record", help="record the reference trajectory store (resumes an interrupted one)")
    add_config_options(p)
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--no-budget", action="store_true", help="record even if an estimate exceeds record.max_*")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("inspect", help="print a summary of a trajectory store")
    p.add_argument("store", help="store directory")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of every file")
    p.set_defaults(func=cmd_inspect)
