"""``currsearch search --backend ray --address`` against a real 2-node local Ray cluster
(``ray start --head`` plus one worker node, both stopped by PID) gives the serial scores
(issue 16). Ray 2.60 turns token authentication on by default: the nodes and the driver run
with ``RAY_AUTH_MODE=disabled`` here, as on a trusted network (README, "Ray cluster").

Opt-in (``CURRSEARCH_TEST_RAY_CLUSTER=1 python -m pytest tests/test_ray_cluster.py``): starting
two Ray nodes takes 15-80 s on 2 cores, more than the whole default suite may spend."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from currsearch.cli import main
from currsearch.record import record

pytestmark = [
    pytest.mark.skipif(shutil.which("ray") is None, reason="the `ray` command is not installed"),
    pytest.mark.skipif(os.environ.get("CURRSEARCH_TEST_RAY_CLUSTER") != "1",
                       reason="opt-in: set CURRSEARCH_TEST_RAY_CLUSTER=1 (starts a 2-node Ray cluster, 15-80 s)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def cluster(tmp_path, monkeypatch):
    """A head node and one worker node (1 CPU each) on 127.0.0.1; yields the address."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's AF_UNIX socket paths must stay under 108 bytes
    log = open(tmp_path / "ray_head.log", "w")
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    procs = [subprocess.Popen(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--include-dashboard", "false", "--temp-dir", temp] + common,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    address = f"127.0.0.1:{port}"
    for _ in range(360):  # the head accepts connections (slow on a loaded machine)
        if procs[0].poll() is not None:
            pytest.fail(f"ray start --head exited with {procs[0].returncode}: {(tmp_path / 'ray_head.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    procs.append(subprocess.Popen(["ray", "start", "--address", address, "--node-ip-address", "127.0.0.1"] + common,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    ray.init(address=address, include_dashboard=False, log_to_driver=False)  # wait until the worker node has joined
    for _ in range(240):
        if sum(n["Alive"] for n in ray.nodes()) == 2:
            break
        time.sleep(0.5)
    ray.shutdown()  # the command under test connects on its own, through --address
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(procs):  # stop each node's process group by PID
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_search_on_a_two_node_cluster_equals_serial(cluster, tiny_cfg, tiny_trainer, tmp_path):
    store = record(tiny_cfg.replace(record={"projection_dim": 16, "anchor_stride": 4}), tmp_path / "s", progress=False,
                   trainer=tiny_trainer)
    args = ["search", "--quiet", "--store", str(store.path), "--trials", "8", "--batch", "4"]
    assert main(args + ["--out", str(tmp_path / "serial")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray"), "--backend", "ray", "--actors", "2", "--address", cluster]) == 0
    serial, ray_res = (json.loads((tmp_path / d / "search.json").read_text())["top"] for d in ("serial", "ray"))
    assert ray_res == serial
