"""Search spaces: every decoded trial is a permutation; encode inverts suggest through real
Optuna studies (enqueue_trial + ask, FixedTrial); non-representable orders and unknown
names raise clear errors."""

import optuna
import pytest
import torch

from currsearch.errors import ConfigError, OrderError
from currsearch.orders import random_order, validate_orders
from search_spaces import BatchInfo, available_spaces, get_space, heuristic_orders, heuristic_params, lfr_baseline

optuna.logging.set_verbosity(optuna.logging.WARNING)

CASES = [
    ("lehmer", {}),
    ("random_keys", {}),
    ("block", {}),
    ("block", {"by": "difficulty", "n_buckets": 3}),
    ("curriculum", {}),
    ("lfr", {}),
    ("interleave", {}),
]
IDS = [n + ("-" + "-".join(f"{k}={v}" for k, v in o.items()) if o else "") for n, o in CASES]


@pytest.fixture(scope="module")
def info8(tiny_trainer):
    info = BatchInfo.from_plan(tiny_trainer.plan)
    assert info.T == 8 and len(info.domain_names) == 4
    return info


@pytest.fixture(scope="module")
def info37():
    g = torch.Generator().manual_seed(0)
    names = ["arxiv", "code", "news", "web", "wiki"]
    domains = [names[i % 5] for i in torch.randperm(37, generator=g).tolist()]
    diff = torch.rand(37, generator=g, dtype=torch.float64)
    diff[5] = diff[11]  # a tie: broken by batch index
    return BatchInfo(domains=domains, difficulty=diff)


@pytest.fixture(params=["info8", "info37"])
def info(request):
    return request.getfixturevalue(request.param)


def _roundtrip(space, order):
    order = torch.as_tensor(order, dtype=torch.int64)
    params = space.encode(order)
    assert all(isinstance(v, (int, float, str)) for v in params.values())
    assert torch.equal(space.suggest(optuna.trial.FixedTrial(params)), order)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.enqueue_trial(params)
    trial = study.ask()
    got = space.suggest(trial)
    study.tell(trial, 0.0)
    assert torch.equal(got, order), (space.name, params)
    assert space.representable(order)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_random_trials_decode_to_permutations_and_roundtrip(info, name, opts):
    space = get_space(name, info, **opts)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    orders = []
    for i in range(50):
        trial = study.ask()
        order = space.suggest(trial)
        study.tell(trial, float(i % 7))
        assert order.dtype == torch.int64 and order.shape == (info.T,)
        validate_orders(order, info.T)
        orders.append(order)
    for order in orders[:10]:
        _roundtrip(space, order)


@pytest.mark.parametrize("name", ["lehmer", "random_keys"])
def test_full_permutation_spaces_encode_any_permutation(info, name):
    space = get_space(name, info)
    for seed in range(10):
        _roundtrip(space, random_order(info.T, seed))
    _roundtrip(space, torch.arange(info.T).flip(0))


def test_block_space_structure(info37):
    space = get_space("block", info37)
    assert space.B == 5
    params = {"block_0": 4, "block_1": 0, "block_2": 0, "block_3": 0, "within": "easy_to_hard"}
    order = space.suggest(optuna.trial.FixedTrial(params))
    doms = [info37.domains[b] for b in order.tolist()]
    first = info37.domain_names[4]
    n_first = doms.count(first)
    assert doms[:n_first] == [first] * n_first  # the last-named domain runs first, contiguously
    seg = order[:n_first]
    assert torch.all(info37.difficulty[seg][1:] >= info37.difficulty[seg][:-1])
    # shuffled blocks round-trip through the seed search
    params = {"block_0": 1, "block_1": 2, "block_2": 0, "block_3": 1, "within": "shuffle", "within_seed": 417}
    shuffled = space.suggest(optuna.trial.FixedTrial(params))
    _roundtrip(space, shuffled)
    # difficulty buckets with identity block order and easy_to_hard inside = easy_to_hard curriculum
    buckets = get_space("block", info37, by="difficulty", n_buckets=4)
    want = {"block_0": 0, "block_1": 0, "block_2": 0, "within": "easy_to_hard"}
    assert buckets.encode(info37.by_difficulty()) == want


def test_curriculum_decoding_follows_pacing(info37):
    space = get_space("curriculum", info37)
    T = info37.T
    # start_frac = 1: the whole list is available at once, so the order is the seeded shuffle's ranking
    o = space.decode("easy_to_hard", "linear", 1.0, seed=3)
    prio = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    assert torch.equal(o, torch.sort(prio).indices)
    # small start: step t only draws from the easiest ceil(c(t) T) batches
    o = space.decode("easy_to_hard", "linear", 0.05, seed=3)
    rank = torch.empty(T, dtype=torch.int64)
    rank[info37.by_difficulty()] = torch.arange(T)
    for t in range(T):
        c = 0.05 + 0.95 * t / (T - 1)
        assert rank[o[t]] < max(t + 1, int(torch.tensor(c * T).ceil()))
    # hard_to_easy starts among the hardest
    o = space.decode("hard_to_easy", "step", 0.1, seed=0, n_steps=4)
    assert rank[o[0]] >= T - 4


def test_lfr_phases(info37):
    space = get_space("lfr", info37)
    T = info37.T
    order = space.decode(0.3, 0.1, 3, seed=0)
    nf, nr = space.sizes(0.3, 0.1)
    assert (nf, nr) == (11, 4)
    asc = info37.by_difficulty().tolist()
    review, focus = asc[:nr], set(asc[T - nf :])
    nl = T - nf - nr
    assert set(order[:nl].tolist()) == set(asc[nr : T - nf])
    tail = order[nl:].tolist()
    assert [b for b in tail if b in review] == review  # easiest first
    assert [i for i, b in enumerate(tail) if b in review] == [3, 7, 11, 14]  # after every 3 focus batches
    assert set(b for b in tail if b not in review) == focus
    assert torch.equal(lfr_baseline(info37), order)


def test_interleave_proportions(info37):
    space = get_space("interleave", info37)
    D = len(space.names)
    uniform = space.decode([1.0] * D)
    doms = info37.domain_index()[uniform].tolist()
    assert sorted(doms[:D]) == list(range(D))  # first round: each domain once
    # within each domain: reference order
    for j in range(D):
        got = [b for b in uniform.tolist() if info37.domain_index()[b] == j]
        assert got == sorted(got)
    # a heavy first domain dominates the start
    heavy = space.decode([1.0] + [0.1] * (D - 1))
    first = info37.domain_index()[heavy[:8]].tolist()
    assert first.count(0) >= 5


def test_not_representable_orders_raise(info37):
    T = info37.T
    dom = info37.domain_index()
    a = (dom == 0).nonzero().flatten().tolist()
    rest = [b for b in range(T) if b not in a]
    split = torch.tensor([a[0]] + rest + a[1:][::-1], dtype=torch.int64)  # domain 0 split, not contiguous
    rev = torch.arange(T).flip(0)  # descending index within each domain
    e2h = info37.by_difficulty()
    cases = [
        (get_space("block", info37), split, "not contiguous"),
        (get_space("block", info37, by="difficulty"), torch.cat([e2h[1:], e2h[:1]]), "not contiguous"),
        (get_space("interleave", info37), rev, "reference"),
        (get_space("interleave", info37), heuristic_orders(info37)["domain_blocks"], "weights"),
        (get_space("curriculum", info37), random_order(T, 123), "curriculum"),
        (get_space("lfr", info37), random_order(T, 123), "lfr"),
    ]
    for space, order, words in cases:
        with pytest.raises(OrderError, match=words):
            space.encode(order)
        assert not space.representable(order)
    for name in available_spaces():
        space = get_space(name, info37)
        with pytest.raises(OrderError):
            space.encode(torch.zeros(T, dtype=torch.int64))  # not a permutation
        with pytest.raises(OrderError):
            space.encode(torch.arange(T - 1))  # wrong length


def test_unknown_names_and_options_raise(info8):
    with pytest.raises(ConfigError, match="known spaces: .*lehmer"):
        get_space("nope", info8)
    with pytest.raises(ConfigError, match="unknown option"):
        get_space("lehmer", info8, n_buckets=3)
    with pytest.raises(ConfigError, match="by must be"):
        get_space("block", info8, by="length")
    with pytest.raises(ConfigError, match="difficulty has 3 values"):
        BatchInfo(domains=["a"] * 4, difficulty=[1.0, 2.0, 3.0])


def test_batch_info_from_plan(tiny_trainer, info8):
    plan = tiny_trainer.plan
    assert info8.domains == plan.domains
    assert info8.difficulty.dtype == torch.float64
    assert info8.difficulty.tolist() == [m["unigram_nll"] for m in plan.metadata]
    custom = BatchInfo.from_plan(plan, difficulty=torch.arange(8.0))
    assert torch.equal(custom.by_difficulty(), torch.arange(8))


def test_heuristic_orders_are_permutations_and_enqueueable(info):
    orders = heuristic_orders(info)
    assert set(orders) == {"reference", "easy_to_hard", "hard_to_easy", "domain_blocks", "uniform_interleave", "lfr"}
    for order in orders.values():
        validate_orders(order, info.T)
    for name in available_spaces():
        space = get_space(name, info)
        params = heuristic_params(space, orders)
        assert params
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for p in params:
            study.enqueue_trial(p)
        for p in params:
            trial = study.ask()
            order = space.suggest(trial)
            study.tell(trial, 0.0)
            validate_orders(order, info.T)
            assert trial.params == p
