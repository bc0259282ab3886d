"""Store and state files under tampering (issue 16, items 5-9): one clear StoreError each, and
`record` repairs a store whose manifest is intact."""

import json
import shutil

import pytest
import torch

from currsearch.errors import StoreError
from currsearch.record import record
from currsearch.store import TrajectoryStore


@pytest.fixture(scope="module")
def fault_cfg(tiny_cfg):
    return tiny_cfg.replace(record={"projection_dim": 16, "anchor_stride": 4, "terms": ["batch_losses", "readouts"]})


@pytest.fixture(scope="module")
def store(fault_cfg, tmp_path_factory):
    return record(fault_cfg, tmp_path_factory.mktemp("faults") / "s", progress=False)


def _copy(store, tmp_path, name="d"):
    d = tmp_path / name
    shutil.copytree(store.path, d)
    return d


def _payload(store):
    return {k: v["sha256"] for k, v in store.manifest["files"].items()}


def _edit_manifest(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    m = fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("content", [b"[]", b"null", b"\x93\xff\x00garbage\xfe", b'"a string"', b"17"])
def test_manifest_of_wrong_shape_is_one_store_error(store, tmp_path, content):
    d = _copy(store, tmp_path)
    (d / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match="manifest"):
        TrajectoryStore.open(d)


@pytest.mark.parametrize("key", ["files", "T", "config", "hashes", "anchors"])
def test_manifest_missing_a_key_is_one_store_error(store, tmp_path, key):
    d = _copy(store, tmp_path)
    _edit_manifest(d, lambda m: {k: v for k, v in m.items() if k != key})
    with pytest.raises(StoreError, match=key):
        TrajectoryStore.open(d)


def test_unlisted_data_file_is_an_error(store, tmp_path):
    d = _copy(store, tmp_path)
    rel = "pairs/pairs_00004.safetensors"

    def drop(m):
        del m["files"][rel]
        return m

    _edit_manifest(d, drop)
    with pytest.raises(StoreError, match="pairs_00004"):
        TrajectoryStore.open(d)
    # even unverified, the loaders refuse a file the manifest does not list
    s = TrajectoryStore.open(d, verify=False)
    with pytest.raises(StoreError, match="not listed"):
        s.get("batch_loss")


def test_not_a_safetensors_file_is_one_store_error(store, tmp_path):
    d = _copy(store, tmp_path)
    f = d / "final.safetensors"
    f.write_bytes(b"this is not a safetensors file at all" * 10)

    def rehash(m):
        from currsearch.manifest import sha256_file

        m["files"]["final.safetensors"] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        return m

    _edit_manifest(d, rehash)
    s = TrajectoryStore.open(d)  # checksums match: the damage shows when the file is read
    with pytest.raises(StoreError, match="final.safetensors.*safetensors"):
        s.final()


def test_mistyped_manifest_fields_give_consistent_messages(store, tmp_path):
    d = _copy(store, tmp_path, "schema")
    _edit_manifest(d, lambda m: {**m, "schema_version": str(m["schema_version"])})
    with pytest.raises(StoreError, match="schema_version") as err:
        TrajectoryStore.open(d)
    assert "reads version 1" not in str(err.value) or "'1'" in str(err.value)
    d = _copy(store, tmp_path, "bytes")

    def stringify(m):
        info = m["files"]["final.safetensors"]
        info["bytes"] = str(info["bytes"])
        return m

    _edit_manifest(d, stringify)
    with pytest.raises(StoreError, match="bytes") as err:
        TrajectoryStore.open(d)
    assert "the manifest says" not in str(err.value)


@pytest.mark.parametrize("damage", ["delete_pairs", "tamper_checkpoint", "delete_final", "truncate_final_eval_grads"])
def test_following_the_missing_file_message_repairs_the_store(store, fault_cfg, tmp_path, damage):
    d = _copy(store, tmp_path)
    target = {"delete_pairs": "pairs/pairs_00004.safetensors", "tamper_checkpoint": "checkpoints/ckpt_00004.safetensors",
              "delete_final": "final.safetensors", "truncate_final_eval_grads": "final_eval_grads.safetensors"}[damage]
    f = d / target
    if damage.startswith("delete"):
        f.unlink()
    elif damage.startswith("tamper"):
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(StoreError, match="currsearch record") as err:
        TrajectoryStore.open(d)
    assert target.split("/")[-1] in str(err.value)
    if damage == "tamper_checkpoint":  # seconds the manifest says the reference run took (a marker; steps 0-7)
        _edit_manifest(d, lambda m: {**m, "reference_seconds": 1000.0})
    repaired = record(fault_cfg, d, progress=False)  # what the message says to do
    if damage == "tamper_checkpoint":  # rewound to checkpoint 0: the rerun steps' time replaces theirs, not adds to it
        assert repaired.manifest["reference_seconds"] < 1000.0
    assert _payload(repaired) == _payload(store)
    assert torch.equal(repaired.final()["theta"], store.final()["theta"])
    TrajectoryStore.open(d)


def test_cli_record_repairs_as_the_message_says(store, fault_cfg, tiny_set_args, tmp_path):
    from currsearch.cli import main

    d = _copy(store, tmp_path)
    (d / "pairs" / "pairs_00000.safetensors").unlink()
    with pytest.raises(StoreError, match=f"currsearch record --out {d}"):
        TrajectoryStore.open(d)
    rec = fault_cfg.record
    args = ["record", "--quiet", "--out", str(d), *tiny_set_args, "--set", f"record.projection_dim={rec.projection_dim}",
            "--set", f"record.anchor_stride={rec.anchor_stride}", "--set", f"record.terms={json.dumps(list(rec.terms))}"]
    assert main(args) == 0
    assert _payload(TrajectoryStore.open(d)) == _payload(store)


@pytest.mark.parametrize("cut", ["before_the_file_is_replaced", "after_it_is_replaced"])
def test_a_cache_rewrite_cut_short_by_ctrl_c_reads_back_whole(store, tmp_path, monkeypatch, cut):
    """A listed file's replacement (a calibration or verification cache, rewritten every few runs)
    interrupted at either side of the file's rename: the file matches its entry, old or new content,
    so nothing reads as damage (whose repair would drop the cached runs), and the next write completes."""
    import currsearch.manifest as manifest

    rel = "calibration/x.json"
    s = TrajectoryStore.open(_copy(store, tmp_path))
    s.write_listed_bytes(rel, b"old runs")
    before = cut == "before_the_file_is_replaced"
    real = manifest.atomic_write_bytes if before else manifest.write_manifest
    calls = []

    def interrupted(path, *args):
        calls.append(path)
        if (before and path.name == "x.json") or (not before and len(calls) == 2):  # Ctrl-C right there
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(manifest, "atomic_write_bytes" if before else "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.write_listed_bytes(rel, b"new runs!")
    monkeypatch.undo()
    again = TrajectoryStore.open(s.path)
    assert "next_sha256" in again.manifest["files"][rel]  # the replacement was under way
    assert again.read_listed_bytes(rel) == (b"old runs" if before else b"new runs!") and again.problems() == []
    again.write_listed_bytes(rel, b"newest runs")
    last = TrajectoryStore.open(s.path)
    assert last.read_listed_bytes(rel) == b"newest runs" and "next_sha256" not in last.manifest["files"][rel]


def test_a_kill_in_the_first_manifest_write_does_not_block_the_rerun(store, fault_cfg, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / ".manifest.json.tmp4242").write_bytes(b'{"format": "currs')  # all a kill there leaves
    again = record(fault_cfg, out, progress=False)
    assert _payload(again) == _payload(store) and not list(out.glob(".*.tmp*"))


def test_a_repair_in_another_numerical_environment_is_refused(store, fault_cfg, tmp_path):
    """Files re-recorded with another thread count (or versions, CPU, device) would not fit the
    ones kept: the repair is refused, naming what differs, and nothing is changed."""
    d = _copy(store, tmp_path)
    (d / "pairs/pairs_00004.safetensors").unlink()
    other_threads = lambda m: {**m, "environment": {**m["environment"], "threads": m["environment"]["threads"] + 7}}  # noqa: E731
    _edit_manifest(d, other_threads)
    before = (d / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match=r"another numerical environment: threads"):
        record(fault_cfg, d, progress=False)
    assert (d / "manifest.json").read_bytes() == before
    intact = _copy(store, tmp_path, "intact")
    _edit_manifest(intact, other_threads)
    assert _payload(record(fault_cfg, intact, progress=False)) == _payload(store)  # a complete, intact store opens anywhere


def test_a_second_recording_into_the_same_directory_is_refused(store, fault_cfg, tmp_path):
    import fcntl

    d = _copy(store, tmp_path)
    (d / "pairs/pairs_00004.safetensors").unlink()  # work for a recorder to do
    with open(d / ".record.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # as a recorder in another process holds it
        with pytest.raises(StoreError, match="another process is recording"):
            record(fault_cfg, d, progress=False)
    assert _payload(record(fault_cfg, d, progress=False)) == _payload(store)  # once it is free, the repair runs
