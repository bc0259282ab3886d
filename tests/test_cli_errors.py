"""Bad input on the command line: one ``error:`` line, exit status 2, no traceback, nothing
written (issue 16). The fuzz cases are drawn by a seeded generator, so a failure reproduces."""

import json
import random
import shutil

import pytest

from currsearch.cli import main
from currsearch.record import record
from currsearch.store import TrajectoryStore


@pytest.fixture(scope="module")
def small_store(tiny_cfg, tmp_path_factory) -> TrajectoryStore:
    """A tiny recorded store (T = 8, 2 anchors)."""
    cfg = tiny_cfg.replace(record={"projection_dim": 16, "anchor_stride": 4})
    return record(cfg, tmp_path_factory.mktemp("store") / "s", progress=False)


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _assert_clean_error(rc, err, *fragments):
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ---------------------------------------------------------------- numbered cases of issue 16
@pytest.mark.parametrize("content, fragment", [
    ("[[0, 1, 2, 3, 4, 5, 6, 7]]", "flat list"),                      # 11: nested list
    ("[[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]]", "flat list"),  # 11: two rows
    (b"\xff\xfe[0, 1]", "UTF-8"),                                       # 12: not UTF-8
])
def test_bad_order_files(tmp_path, capsys, tiny_set_args, content, fragment):
    f = tmp_path / "order.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, _, err = _run(["train", "--quiet", "--order", str(f), "--out", str(tmp_path / "o")] + tiny_set_args, capsys)
    _assert_clean_error(rc, err, fragment)
    assert not (tmp_path / "o").exists()


def test_non_utf8_config(tmp_path, capsys):  # 12
    f = tmp_path / "c.toml"
    f.write_bytes(b"[data]\nnum_batches = \xff\xfe\n")
    rc, _, err = _run(["train", str(f), "--quiet"], capsys)
    _assert_clean_error(rc, err, "UTF-8")


@pytest.mark.parametrize("override, fragment", [
    ("train.device=cuda", "train.device"),          # 13
    ("train.device=cuda:7", "train.device"),        # 13
    ("train.device=mps", "train.device"),           # 13
    ("train.seed=99999999999999999999", "train.seed"),  # 14
    ("optim.eps=inf", "optim.eps"),                 # 18
    ("optim.lr=nan", "optim.lr"),                   # 18
])
@pytest.mark.parametrize("command", ["train", "record"])
def test_bad_config_values(tmp_path, capsys, command, override, fragment):
    out = tmp_path / "o"
    rc, _, err = _run([command, "--quiet", "--set", override, "--out", str(out)], capsys)
    _assert_clean_error(rc, err, fragment)
    assert not out.exists()


def test_record_out_is_a_file(tmp_path, capsys, tiny_set_args):  # 17
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run(["record", "--quiet", "--out", str(f)] + tiny_set_args, capsys)
    _assert_clean_error(rc, err, "not a directory")
    assert f.read_text() == "x"


@pytest.mark.parametrize("storage", ["sqlite:////nonexistent/dir/x.db", "bogus://x"])  # 15
def test_bad_storage(tmp_path, capsys, storage, small_store):
    out = tmp_path / "s"
    rc, _, err = _run(["search", "--store", str(small_store.path), "--out", str(out), "--storage", storage,
                       "--trials", "2"], capsys)
    _assert_clean_error(rc, err, "storage")
    assert not out.exists()


def test_search_set_applies_to_the_store_config(tmp_path, capsys, small_store):
    """``search --store S --set k=v`` checks the store's config with the override, not the
    defaults with it: a key that changes no number passes, a trajectory key is refused alone."""
    base = ["search", "--quiet", "--store", str(small_store.path), "--out", str(tmp_path / "s"), "--trials", "2"]
    rc, _, err = _run(base + ["--set", f"train.warmup_cache={tmp_path / 'wc'}"], capsys)
    assert rc == 0, err
    rc, _, err = _run(base + ["--set", "optim.lr=0.0123"], capsys)
    _assert_clean_error(rc, err, "optim.lr")
    assert "data." not in err and "model." not in err


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--random", "-1", "--rounds", "0", "--estimator", "additive"], "random"),  # 16
    (["run", "--top-k", "0"], "top_k"),                                              # 19
    (["run", "--rounds", "-1"], "rounds"),
    (["run", "--objectives", "klingon", "--budget", "40"], "klingon"),
    (["run", "--budget", "5"], "below the minimum"),
    (["run", "--fit-runs", "20", "--budget", "40"], "fit-runs"),
    (["run", "--fit-runs", "20", "--no-budget", "--estimator", "additive"], "fit-runs"),  # not fitted to runs
    (["run", "--budget", "40", "--no-budget"], "not allowed with"),
    (["run", "--strategy", "guided-tpe", "--fit-runs", "30", "--random", "2"], "--fit-runs, --random are not used by the guided-tpe"),
    (["run", "--polish", "0.5"], "--polish is not used by the surrogate strategy"),
    (["ablate", "search", "--top-k", "-1"], "top_k"),                               # 19
    (["search", "--estimator", "bogus", "--trials", "2"], "bogus"),                 # 21
    (["search", "--space", "bogus", "--trials", "2"], "bogus"),                     # 21
])
def test_bad_search_and_run_options(tmp_path, capsys, small_store, tiny_set_args, argv, fragment):
    out = tmp_path / "out"
    extra = ["--store", str(small_store.path)] if argv[0] == "search" else []
    if argv[0] == "run":
        extra = tiny_set_args
    if argv[0] == "ablate":
        extra = ["--models", str(tmp_path / "models")]
    rc, _, err = _run(argv + extra + ["--out", str(out)], capsys)
    _assert_clean_error(rc, err, fragment)
    assert not out.exists(), "a failed command must not leave an output folder"


def test_guided_tpe_with_a_polish_share_refuses_a_two_step_window_before_any_run(tmp_path, capsys, tiny_set_args):
    out = tmp_path / "out"
    rc, _, err = _run(["run", "--strategy", "guided-tpe", "--budget", "8", *tiny_set_args, "--set", "data.num_batches=2",
                       "--out", str(out)], capsys)
    _assert_clean_error(rc, err, "at least 3 steps")
    assert "--polish 0" in err and not (out / "guided.journal").exists()


# ---------------------------------------------------------------- fuzz: >= 200 malformed inputs
def _malformed_json_values(rng: random.Random, T: int) -> list:
    pool = [
        [], [[]], None, True, 3, "0,1,2", {"order": None}, {"ord": list(range(T))}, {"order": "x"},
        list(range(T - 1)), list(range(T + 1)), [0] * T, [-1] + list(range(1, T)), [float(i) + 0.5 for i in range(T)],
        [True] * T, [str(i) for i in range(T)], [10**30] + list(range(1, T)), [list(range(T))] * 2, {"order": [[0]]},
        [None] * T, [[i] for i in range(T)],
    ]
    for _ in range(40):
        o = list(range(T))
        rng.shuffle(o)
        i = rng.randrange(T)
        o[i] = rng.choice([o[(i + 1) % T], T + rng.randrange(5), -rng.randrange(1, 5), 1.5, "a", None, [o[i]]])
        pool.append(o if rng.random() < 0.7 else {"order": o})
    return pool


def _malformed_bytes(rng: random.Random, n: int) -> list[bytes]:
    out = [b"", b"\x00", b"\xff\xfe\xfd", b"[", b"{", b"[1, 2", b"{\"order\": [1,}", b"nan", b"[NaN]", b"[Infinity]",
           b"[" * 5000 + b"]" * 5000]
    out += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(n)]
    return out


def test_fuzz_order_files(tmp_path, capsys, tiny_set_args):
    rng = random.Random(1234)
    T = 8
    cases = [json.dumps(v).encode() for v in _malformed_json_values(rng, T)] + _malformed_bytes(rng, 30)
    assert len(cases) >= 80
    out = tmp_path / "o"
    for i, data in enumerate(cases):
        f = tmp_path / f"order_{i}.json"
        f.write_bytes(data)
        rc, _, err = _run(["train", "--quiet", "--order", str(f), "--out", str(out)] + tiny_set_args, capsys)
        _assert_clean_error(rc, err)
        assert not out.exists(), data[:80]


def _config_cases(rng: random.Random) -> list[bytes]:
    keys = {"data": ["num_batches", "batch_size", "seq_len", "vocab_size", "batching", "corpus"],
            "model": ["n_layer", "n_embd", "n_head", "path"], "optim": ["lr", "eps", "beta1", "schedule", "grad_clip"],
            "train": ["seed", "warmup_steps", "device", "carry_optimizer_state"], "record": ["projection", "projection_dim"]}
    bad_values = ["-1", "0", "1e400", "inf", "-inf", "nan", "\"x\"", "[1, 2]", "{a = 1}", "99999999999999999999",
                  "true", "\"cuda:7\"", "\"mps\"", "1.5"]
    cases = [b"[data", b"= 3", b"[nosuch]\nx = 1\n", b"data = 3\n", b"\xff\xfe\x00", b"[data]\nnum_batches = 1\n",
             b"[data]\nunknown_key = 1\n"]
    while len(cases) < 80:
        sec = rng.choice(sorted(keys))
        key = rng.choice(keys[sec])
        val = rng.choice(bad_values)
        text = f"[{sec}]\n{key} = {val}\n".encode()
        if rng.random() < 0.15:
            text = text.replace(b"=", b"==")
        cases.append(text)
    return cases


def test_fuzz_config_files(tmp_path, capsys):
    rng = random.Random(99)
    out = tmp_path / "o"
    n_err = 0
    for i, data in enumerate(_config_cases(rng)):
        f = tmp_path / f"c_{i}.toml"
        f.write_bytes(data)
        rc, _, err = _run(["record", str(f), "--quiet", "--out", str(out), "--no-budget", "--set", "data.num_batches=1"],
                          capsys)  # num_batches=1 is invalid: a config that parses still fails before any work
        _assert_clean_error(rc, err)
        assert not out.exists(), data
        n_err += 1
    assert n_err >= 80


def _manifest_cases(rng: random.Random, good: dict) -> list[bytes]:
    cases = [b"[]", b"null", b"{}", b"3", b"\"x\"", b"{", b"\xff\xfe"]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 100))) for _ in range(8)]
    for key in sorted(good):
        d = dict(good)
        del d[key]
        cases.append(json.dumps(d).encode())
        for v in (None, [], {}, "1", -1, 1.5, "x" * 3):
            if v != good[key]:
                cases.append(json.dumps({**good, key: v}).encode())
    rng.shuffle(cases)
    return cases


def test_fuzz_manifests(tmp_path, capsys, small_store):
    good = json.loads((small_store.path / "manifest.json").read_text())
    cases = _manifest_cases(random.Random(7), good)
    assert len(cases) >= 40
    d = tmp_path / "store"
    shutil.copytree(small_store.path, d)
    n_err = 0
    for data in cases:
        (d / "manifest.json").write_bytes(data)
        rc, out, err = _run(["inspect", str(d)], capsys)
        if rc == 0:  # a change that leaves a valid manifest (e.g. an informational field): must still read cleanly
            continue
        _assert_clean_error(rc, err)
        n_err += 1
    assert n_err >= 40


@pytest.mark.parametrize("command", [["train"], ["analyze", "positions"], ["benchmark", "fidelity"], ["ablate", "train"]])
@pytest.mark.parametrize("under", [False, True])
def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command, under):
    """An --out that is a file, or lies under one, stops every command with one error line before it trains."""
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run(command + ["--quiet", "--out", str(f / "sub" if under else f)], capsys)
    _assert_clean_error(rc, err, "is a file, not a directory")
    assert f.read_text() == "x"


def test_library_writers_refuse_an_output_under_a_file(tiny_cfg, tiny_trainer, tmp_path):
    """Called as a library (no CLI check before them), the writers raise ConfigError naming the
    file in the way, before any training, instead of NotADirectoryError after it."""
    from currsearch.ablate import train_partitions
    from currsearch.errors import ConfigError
    from currsearch.export import export_order
    from currsearch.reports.common import write_result_files
    from currsearch.study import make_storage

    f = tmp_path / "file"
    f.write_text("x")
    calls = [
        lambda: record(tiny_cfg, f, progress=False, trainer=tiny_trainer),
        lambda: record(tiny_cfg, f / "store", progress=False, trainer=tiny_trainer),
        lambda: train_partitions(tiny_cfg, f / "models", trainer=tiny_trainer),
        lambda: write_result_files(f / "report", "r", {"x": 1}, "# r\n"),
        lambda: export_order(f / "order.json", list(range(8))),
        lambda: make_storage(f / "study.journal"),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match="is a file, not a directory"):
            call()
    assert f.read_text() == "x"
