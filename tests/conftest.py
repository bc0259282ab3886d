"""Shared fixtures: tiny real configs on the embedded corpus (seconds on 2 CPU cores)."""

import json
import os
import tempfile

import pytest

# one cache per test session (tokenizers, warm-up phases: train.warmup_cache = "auto"), outside the user's home
os.environ.setdefault("CURRSEARCH_CACHE", tempfile.mkdtemp(prefix="currsearch-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Single-threaded BLAS (numpy/scipy's OpenBLAS reads these when it loads, so before any import
# of numpy): the calibrated estimators' ridge fits solve ~750 600x600 systems, and a two-thread
# OpenBLAS on a busy 2-core machine took 0.33 s per solve vs 0.017 s on one (measured, load 7).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, os.environ.get("CURRSEARCH_TEST_THREADS", "1"))

#: device of the device-agnostic tests (every test built on ``tiny_cfg``/``tiny_trainer``/
#: ``tiny_set_args``): ``CURRSEARCH_TEST_DEVICE=cuda`` runs them on the GPU (benchmarks/gpu_check.sh)
DEVICE = os.environ.get("CURRSEARCH_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda"):  # cuBLAS reproducibility (read when CUDA initializes, so before torch loads it)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

#: measured seconds of each slow file's tests on 2 idle cores (`pytest --durations=0`, summed per
#: file). Files run longest first (`--no-loadscope-reorder` in pyproject.toml keeps this order;
#: xdist's own order is by number of tests), so no long file starts last on one worker while the
#: other idles. Unlisted files are short and follow in collection order.
FILE_SECONDS = {
    "test_backends_ray.py": 30, "test_run.py": 25, "test_guided.py": 14, "test_search_resume.py": 9,
    "test_response.py": 8, "test_estimators.py": 8, "test_positions.py": 7, "test_trust_region.py": 7,
    "test_polish.py": 5, "test_record.py": 5, "test_ablate.py": 4, "test_search.py": 4, "test_arch.py": 3,
    "test_warmup.py": 3, "test_search_spaces.py": 3,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's tests keep their order


def pytest_configure(config):
    """Torch settings for the processes that run tests, before any Trainer exists. The xdist
    controller runs none, so it never imports torch (3 s of the suite's start-up)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import torch

    # One intra-op thread for the whole session: the tiny models gain nothing from more, and on a
    # busy 2-core machine two threads cost ~10x (measured: one tiny training run 0.19 s wall /
    # 0.04 s CPU on 1 thread vs 1.9 s / 0.6 s on 2, load 7). Set once, so every in-process
    # bit-identity check compares runs made under the same thread count (Ray workers already
    # run on one thread). CURRSEARCH_TEST_THREADS overrides it.
    torch.set_num_threads(int(os.environ.get("CURRSEARCH_TEST_THREADS", "1")))
    if DEVICE.startswith("cuda"):
        # the bit-identity tests compare two GPU runs: deterministic kernels where CUDA has them
        # (embedding backward, scatter-add), a warning where it has none
        torch.use_deterministic_algorithms(True, warn_only=True)


TINY = {
    "data": {"num_batches": 8, "batch_size": 4, "seq_len": 32, "eval_seqs_per_domain": 4, "vocab_size": 512},
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
    "optim": {"lr": 3e-3},
    "train": {"warmup_steps": 10, "device": DEVICE},
}


@pytest.fixture(scope="session")
def tiny_cfg():
    """A config small enough that one training run takes well under a second (a ``Config``)."""
    from currsearch.config import Config

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


@pytest.fixture(scope="session")
def search_store(tiny_cfg, tmp_path_factory):
    """A tiny recorded store (default terms, projection_dim 32) shared by the search and Ray backend tests."""
    from currsearch.record import record

    s = record(tiny_cfg.replace(record={"projection_dim": 32}), tmp_path_factory.mktemp("search") / "s", progress=False)
    s.trainer()  # build (and cache) the plan once for every search
    return s
