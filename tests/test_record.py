"""Recorder and trajectory store: resume, integrity, projection, exact read-outs."""

import json
import random

import pytest
import torch

import currsearch.record as record_module
from currsearch.errors import BudgetError, ConfigError, StoreError
from currsearch.gradients import eval_gradients
from currsearch.projection import Projector
from currsearch.record import record
from currsearch.store import TrajectoryStore


@pytest.fixture(scope="module")
def rec_cfg(tiny_cfg):
    return tiny_cfg.replace(record={"projection_dim": 64, "checkpoint_eval": True,
                                    "terms": ["batch_losses", "updates", "grads", "eval_grads", "readouts", "readouts_checkpoint"]})


@pytest.fixture(scope="module")
def store(rec_cfg, tmp_path_factory):
    return record(rec_cfg, tmp_path_factory.mktemp("store") / "s", progress=False)


@pytest.fixture
def crash_after_writes(monkeypatch):
    """``crash_after_writes(n)``: the recorder's n-th manifest write from now on raises
    ``KeyboardInterrupt`` right after it lands (a kill between two atomic writes)."""

    def arm(n: int):
        real, count = record_module.write_manifest, [0]

        def write_then_maybe_crash(*args, **kwargs):
            real(*args, **kwargs)
            count[0] += 1
            if count[0] >= n:
                monkeypatch.setattr(record_module, "write_manifest", real)
                raise KeyboardInterrupt(f"simulated crash after {count[0]} writes")

        monkeypatch.setattr(record_module, "write_manifest", write_then_maybe_crash)

    return arm


def _payload(store):
    return {k: v["sha256"] for k, v in store.manifest["files"].items()}


def test_store_contents_and_reference_run(store, tiny_trainer, rec_cfg):
    T, E = store.T, len(store.eval_names)
    assert store.get("update_proj").shape == (T, T, 64)
    assert store.get("readout_update").shape == (T, T, E) and store.get("readout_update").dtype == torch.float64
    assert store.get("eval_grad_proj").shape == (T, E, 64) and store.reference_eval_losses().shape == (T + 1, E)
    ref = tiny_trainer.train(torch.arange(T))
    assert torch.equal(store.final(device=ref.theta.device)["theta"], ref.theta)  # the recorded reference run is the Trainer's
    assert torch.equal(store.final()["eval_loss"], ref.eval_losses)
    assert store.manifest["reference_train_loss"] == ref.train_losses.tolist()
    assert abs(store.nbytes() - store.manifest["formula_bytes"]) / store.manifest["formula_bytes"] < 0.05
    assert "T = 8 batches" in store.summary()
    assert store.domains == tiny_trainer.plan.domains and store.metadata == tiny_trainer.plan.metadata


def test_exact_readouts_equal_direct_computation(store, tiny_trainer):
    t, l = 3, 5
    c = store.checkpoint(t, device=tiny_trainer.device)
    from currsearch.adam import AdamState, adam_direction, clip_grad

    tr = tiny_trainer
    _, g = tr.model.grad(c["theta"], tr.batch(l))
    g = clip_grad(g, tr.cfg.optim.grad_clip)
    gamma, _ = adam_direction(g, AdamState(c["adam_m"], c["adam_v"], int(c["adam_step"])), c["theta"], tr.model.decay_mask, tr.cfg.optim)
    eg = eval_gradients(tr, c["theta"])
    direct = (eg.double() @ gamma.double())
    torch.testing.assert_close(store.get("readout_update")[t, l], direct, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(store.get("readout_grad")[t, l], eg.double() @ g.double(), rtol=1e-4, atol=1e-7)
    eg_final = eval_gradients(tr, store.final(device=tr.device)["theta"])
    torch.testing.assert_close(store.get("readout_update_final")[t, l], eg_final.double() @ gamma.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(store.get("readout_grad_final")[t, l], eg_final.double() @ g.double(), rtol=1e-4, atol=1e-7)
    # the "all" eval gradient is the gradient of the loss over the union of eval sets
    _, g_all = tr.model.grad(c["theta"], tr.plan.eval_sets["all"])
    torch.testing.assert_close(eg[-1], g_all, rtol=1e-4, atol=1e-6)
    assert abs(float(store.get("batch_loss")[t, l]) - float(tr.model.loss(c["theta"], tr.batch(l)))) < 1e-5


def test_resume_after_kill_equals_uninterrupted(store, rec_cfg, tmp_path, crash_after_writes):
    n_files = len(store.manifest["files"])
    crash_at = random.Random(1234).randint(2, n_files)  # somewhere in the reference run or the pairs
    out = tmp_path / "killed"
    crash_after_writes(crash_at)
    with pytest.raises(KeyboardInterrupt):
        record(rec_cfg, out, progress=False)
    with pytest.raises(StoreError, match="incomplete"):
        TrajectoryStore.open(out)
    stray = out / ".ckpt_00003.safetensors.tmp4242"  # as a kill in the middle of an atomic write leaves it
    stray.write_bytes(b"partial")
    resumed = record(rec_cfg, out, progress=False)
    assert _payload(resumed) == _payload(store)
    assert not stray.exists()
    # a second crash in the pair phase resumes too
    out2 = tmp_path / "killed2"
    crash_after_writes(n_files - 2)
    with pytest.raises(KeyboardInterrupt):
        record(rec_cfg, out2, progress=False)
    assert _payload(record(rec_cfg, out2, progress=False)) == _payload(store)


def test_tampered_truncated_and_missing_files(store, tmp_path):
    import shutil

    for mode in ("tamper", "truncate", "delete"):
        d = tmp_path / mode
        shutil.copytree(store.path, d)
        f = d / "pairs" / "pairs_00002.safetensors"
        data = bytearray(f.read_bytes())
        if mode == "tamper":
            data[-3] ^= 0xFF
            f.write_bytes(bytes(data))
        elif mode == "truncate":
            f.write_bytes(bytes(data[:-10]))
        else:
            f.unlink()
        with pytest.raises(StoreError, match="pairs_00002"):
            TrajectoryStore.open(d)


def test_newer_schema_and_mismatched_config_rejected(store, rec_cfg, tmp_path):
    import shutil

    d = tmp_path / "schema"
    shutil.copytree(store.path, d)
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="schema version 99"):
        TrajectoryStore.open(d)
    with pytest.raises(StoreError, match="optim.lr"):
        store.check_config(rec_cfg.replace(optim={"lr": 0.5}))
    with pytest.raises(StoreError, match="optim.lr"):
        record(rec_cfg.replace(optim={"lr": 0.5}), store.path, progress=False)
    with pytest.raises(StoreError, match="record settings"):
        record(rec_cfg.replace(record={"projection_dim": 32}), store.path, progress=False)
    with pytest.raises(StoreError, match="not a trajectory store"):
        TrajectoryStore.open(tmp_path)


def test_store_rejects_other_model_weights(store, rec_cfg):
    from currsearch.train import Trainer

    other = Trainer.from_config(rec_cfg.replace(train={"seed": 7}))
    with pytest.raises(StoreError, match="init_weights"):
        store.check_trainer(other)
    with pytest.raises(StoreError, match="init_weights"):
        store.use_trainer(other)
    with pytest.raises(ConfigError, match="another config"):
        record(rec_cfg, store.path, progress=False, trainer=other)


def test_record_shares_the_given_trainer(store, rec_cfg):
    from currsearch.train import Trainer

    tr = Trainer.from_config(rec_cfg)
    again = record(rec_cfg, store.path, progress=False, trainer=tr)  # complete store: reused
    assert again.trainer() is tr and _payload(again) == _payload(store)


def test_anchor_stride_and_budget(rec_cfg, tmp_path):
    s = record(rec_cfg.replace(record={"anchor_stride": 4, "terms": ["readouts"]}), tmp_path / "a", progress=False)
    assert s.anchors == [0, 4] and s.get("readout_update_final").shape[0] == 2
    with pytest.raises(StoreError, match="update_proj"):
        s.get("update_proj")
    with pytest.raises(BudgetError, match="disk"):
        record(rec_cfg.replace(record={"max_disk_bytes": 1000}), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="unknown record.terms"):
        record(rec_cfg.replace(record={"terms": ["nope"]}), tmp_path / "c", progress=False)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "countsketch"])
def test_projection_reproducible_and_preserves_inner_products(kind):
    P, k = 5000, 2048
    p1, p2 = Projector(kind, P, k, seed=3, block=1000), Projector(kind, P, k, seed=3, block=1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, P, generator=g)
    assert torch.equal(p1.project(x), p2.project(x))
    assert not torch.equal(p1.project(x), Projector(kind, P, k, seed=4, block=1000).project(x))
    px = p1.project(x)
    exact = x @ x.T
    # JL: |<Px,Py> - <x,y>| <= c * ||x|| ||y|| / sqrt(k) with high probability. Dense sketches have
    # sub-Gaussian tails (c = 4 over these 400 pairs); CountSketch's 1-sparse columns only give a
    # second-moment (Chebyshev) guarantee, so its tail is heavier (c = 6) at the same mean error.
    norms = x.norm(dim=1)
    ratio = (px @ px.T - exact).abs() / (norms[:, None] * norms[None, :] / k**0.5)
    assert ratio.max() <= (6.0 if kind == "countsketch" else 4.0)
    assert ratio.mean() <= 1.2


def test_cli_record_and_inspect(rec_cfg, tmp_path, capsys):
    from currsearch.cli import main

    args = ["record", "--quiet", "--out", str(tmp_path / "s")]
    for sec, vals in {"data": rec_cfg.data, "model": rec_cfg.model, "train": rec_cfg.train}.items():
        for k, v in vals.model_dump().items():
            if v is not None:
                args += ["--set", f"{sec}.{k}={json.dumps(v)}"]
    args += ["--set", "optim.lr=0.003", "--set", "record.projection_dim=16", "--set", "record.anchor_stride=4"]
    assert main(args) == 0
    assert main(["inspect", str(tmp_path / "s")]) == 0
    assert "anchors: 2 (stride 4)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 2


def test_a_diverging_reference_run_stops_with_a_clear_error(rec_cfg, tmp_path, monkeypatch):
    """A reference run whose loss goes non-finite (as a too high learning rate makes it) stops
    the recording there, before hours of pair terms of NaNs."""
    from currsearch.train import Trainer

    tr = Trainer.from_config(rec_cfg)
    tr.window_start(progress=False)  # the warm-up phase's steps are not the window's
    real, steps = tr.step, []

    def diverging_step(theta, adam, lr, batch):  # the real step; the third window step reports a NaN loss
        theta, adam, loss = real(theta, adam, lr, batch)
        if lr == 0.0:  # the cost estimate's timing steps
            return theta, adam, loss
        steps.append(loss)
        return theta, adam, float("nan") if len(steps) == 3 else loss

    monkeypatch.setattr(tr, "step", diverging_step)
    with pytest.raises(ConfigError, match="diverged at window step 2"):
        record(rec_cfg, tmp_path / "s", progress=False, trainer=tr)
    assert len(steps) == 3
