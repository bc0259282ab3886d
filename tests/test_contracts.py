"""Explicit contracts of the lower layers (issue 15, items 3 and 5): estimator capabilities,
projection kinds, calibration caches in the checksummed manifest, the store's Trainer, and
module-level project imports."""

import ast
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from currsearch.config import Config
from currsearch.errors import ConfigError, StoreError
from currsearch.gradients import batch_gradients, eval_gradients
from currsearch.manifest import sha256_file
from currsearch.projection import KINDS, ProjectionKind, Projector
from currsearch.record import record
from currsearch.store import TrajectoryStore
from estimators import available, get_estimator
from estimators.base import _REGISTRY, Estimator

ROOT = Path(__file__).resolve().parents[1]


def test_capabilities_are_declared_and_match_the_methods():
    expected = {"reference": (False, True, False), "additive": (True, False, False), "fut1": (False, False, False),
                "fut2": (False, False, False), "fut1-hvp": (False, True, False), "calibrated": (True, False, True),
                "calibrated-interactions": (True, False, True)}
    assert set(expected) <= set(available())
    for name, cls in _REGISTRY.items():
        caps = (cls.has_optimum, cls.has_batch_losses, cls.needs_runs)
        if name in expected:
            assert caps == expected[name], name
        assert cls.has_optimum == callable(getattr(cls, "assignment_optimum", None)), name
        assert cls.has_batch_losses == (cls.estimate_batch_losses is not Estimator.estimate_batch_losses), name
    assert {n for n, cls in _REGISTRY.items() if cls.estimate_costs_runs} == {"fut1-hvp"}


@pytest.mark.parametrize("name, option, fragment", [("fut1-hvp", {"chunk": 0}, "chunk"), ("fut1-hvp", {"readout": "x"}, "readout"),
                                                    ("precedence", {"chunk": 0}, "chunk"), ("additive", {"readout": "x"}, "readout")])
def test_a_refused_option_value_is_one_config_error(name, option, fragment):
    with pytest.raises(ConfigError, match=f"estimator '{name}': {fragment}"):
        get_estimator(name, **option)


def test_a_wrong_capability_declaration_is_refused():
    with pytest.raises(TypeError, match="assignment_optimum"):
        type("Bad", (Estimator,), {"has_optimum": True, "_fit": lambda s, st: None, "_estimate": lambda s, o: o})
    with pytest.raises(TypeError, match="estimate_batch_losses"):
        type("Bad2", (Estimator,), {"has_batch_losses": True, "_fit": lambda s, st: None, "_estimate": lambda s, o: o})


def test_projection_kinds_enum_validates_and_keeps_the_manifest_string():
    assert KINDS == tuple(k.value for k in ProjectionKind) == ("rademacher", "gaussian", "countsketch")
    p = Projector(ProjectionKind.GAUSSIAN, 10, 4, seed=0)
    assert p.describe()["kind"] == "gaussian" and type(p.describe()["kind"]) is str
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p.project(x), Projector("gaussian", 10, 4, seed=0).project(x))
    cfg = Config().replace(record={"projection": "rademacher"})
    assert cfg.record.projection == "rademacher" and cfg.to_dict()["record"]["projection"] == "rademacher"
    with pytest.raises(ConfigError, match="record.projection"):
        Config().replace(record={"projection": "sparse"})
    with pytest.raises(ValueError, match="unknown projection kind"):
        Projector("sparse", 10, 4, seed=0)


@pytest.fixture(scope="module")
def bare_store(tiny_cfg, tiny_trainer, tmp_path_factory):
    return record(tiny_cfg.replace(record={"terms": ()}), tmp_path_factory.mktemp("cal") / "s", progress=False, trainer=tiny_trainer)


def test_calibration_cache_is_listed_and_checked(bare_store, tiny_trainer, tmp_path, caplog):
    d = tmp_path / "s"
    shutil.copytree(bare_store.path, d)
    store = TrajectoryStore.open(d, trainer=tiny_trainer)
    assert store.trainer() is tiny_trainer
    est = get_estimator("calibrated", n_runs=8).fit(store)
    (cache,) = d.glob("calibration/*.json")
    rel = cache.relative_to(d).as_posix()
    listed = json.loads((d / "manifest.json").read_text())["files"][rel]
    assert listed == {"sha256": sha256_file(cache), "bytes": cache.stat().st_size}
    again = get_estimator("calibrated", n_runs=8).fit(TrajectoryStore.open(d, trainer=tiny_trainer))
    assert torch.equal(again.cost, est.cost)
    # tampered: opening the store or fitting from it says so
    data = json.loads(cache.read_text())
    data["losses"][0][0] += 1.0
    cache.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="calibration.*SHA-256"):
        TrajectoryStore.open(d)
    with pytest.raises(StoreError, match="calibration.*SHA-256.*currsearch record"):
        get_estimator("calibrated", n_runs=8).fit(store)
    # following the message: record drops the damaged cache, the next fit redoes the same runs
    repaired = record(store.config(), d, progress=False, trainer=tiny_trainer)
    assert rel not in repaired.manifest["files"] and not cache.exists()
    refit = get_estimator("calibrated", n_runs=8).fit(repaired)
    assert torch.equal(refit.cost, est.cost)
    # unlisted (entry removed): not trusted, refitted with a warning
    cache.write_text(json.dumps(data))
    m = json.loads((d / "manifest.json").read_text())
    del m["files"][rel]
    (d / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="estimators.calibrated"):
        fresh = get_estimator("calibrated", n_runs=8).fit(TrajectoryStore.open(d, trainer=tiny_trainer))
    assert "not listed" in caplog.text and torch.equal(fresh.cost, est.cost)
    assert json.loads((d / "manifest.json").read_text())["files"][rel]["sha256"] == sha256_file(cache)


def test_store_takes_a_trainer_and_refuses_another(bare_store, tiny_trainer, tiny_cfg):
    s = TrajectoryStore.open(bare_store.path, trainer=tiny_trainer)
    assert s.trainer() is tiny_trainer
    from currsearch.train import Trainer

    other = Trainer.from_config(tiny_cfg.replace(train={"seed": 3}))
    with pytest.raises(StoreError, match="init_weights"):
        TrajectoryStore.open(bare_store.path, trainer=other)
    built = TrajectoryStore.open(bare_store.path).trainer()  # none given: built from the recorded config
    assert torch.equal(built.theta_init, tiny_trainer.theta_init)


def test_gradient_kernels_are_the_recorders(tiny_trainer):
    import currsearch.record as rec
    import estimators.hvp as hvp

    assert rec.eval_gradients is eval_gradients and rec.batch_gradients is batch_gradients
    assert hvp.eval_gradients is eval_gradients
    theta = tiny_trainer.window_start().theta
    g, losses = batch_gradients(tiny_trainer, theta, tiny_trainer.plan.batches[:3], chunk=2)
    assert g.shape == (3, tiny_trainer.model.num_params) and losses.dtype == torch.float64
    assert abs(float(losses[1]) - float(tiny_trainer.model.loss(theta, tiny_trainer.batch(1)))) < 1e-5


LOWER = ["currsearch/" + f for f in ("record.py", "store.py", "manifest.py", "projection.py", "config.py", "train.py",
                                      "model.py", "adam.py", "data.py", "plan.py", "errors.py", "gradients.py")]
LOWER += ["estimators/" + f for f in ("base.py", "calibrated.py", "common.py", "fut.py", "hvp.py", "simple.py")]


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            yield node, [("." * getattr(node, "level", 0)) + n for n in names]


def _project(name: str) -> bool:
    return name.startswith(".") or name.split(".")[0] in ("currsearch", "estimators", "search_spaces")


@pytest.mark.parametrize("rel", LOWER)
def test_project_imports_are_at_module_level(rel):
    path = ROOT / rel
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node, names in _imports(tree):
        if any(_project(n) for n in names):
            assert id(node) in top, f"{rel}:{node.lineno} imports {names} inside a function or block"


def test_low_modules_import_nothing_above_them():
    banned = {"currsearch/manifest.py": ("train", "record", "store"), "currsearch/gradients.py": ("record", "store"),
              "estimators/hvp.py": ("record",)}
    for rel, bad in banned.items():
        for _, names in _imports(ast.parse((ROOT / rel).read_text())):
            for n in names:
                assert n.lstrip(".").split(".")[-1] not in bad and not any(n.endswith("." + b) for b in bad), (rel, n)
