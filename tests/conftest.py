"""Shared fixtures: tiny real configs on the embedded corpus (seconds on 2 CPU cores)."""

import json
import os
import tempfile

import pytest

# one tokenizer cache per test session, outside the user's home
os.environ.setdefault("CURRSEARCH_CACHE", tempfile.mkdtemp(prefix="currsearch-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from currsearch.config import Config  # noqa: E402

TINY = {
    "data": {"num_batches": 8, "batch_size": 4, "seq_len": 32, "eval_seqs_per_domain": 4, "vocab_size": 512},
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
    "optim": {"lr": 3e-3},
    "train": {"warmup_steps": 10},
}


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    """A config small enough that one training run takes well under a second."""
    return Config().replace(**TINY)


@pytest.fixture(scope="session")
def tiny_trainer(tiny_cfg):
    from currsearch.train import Trainer

    return Trainer.from_config(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_set_args(tiny_cfg) -> list[str]:
    """``--set section.key=value`` command-line arguments that give a command ``tiny_cfg``'s
    data, model, optim and train sections (append ``record.*`` settings as a test needs)."""
    args = []
    for sec in ("data", "model", "optim", "train"):
        for k, v in getattr(tiny_cfg, sec).model_dump().items():
            if v is not None:
                args += ["--set", f"{sec}.{k}={json.dumps(v)}"]
    return args
