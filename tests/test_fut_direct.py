"""fut1 / fut2 (estimators/fut.py, arXiv 2505.22042) against a direct computation at T = 3 and 4.

The reference-order tests (test_estimators.py) cannot catch a wrong expansion: on the
reference order the deviation d stays 0 whatever the curvature. Here the estimators'
formulas are evaluated by hand, coordinate by coordinate in Python floats, from the store's
documented tensors only (``checkpoint(t)["theta"]``, ``final()["theta"]``/``["eval_loss"]``,
``get("update_proj")``, ``final_eval_grads_proj()``, the manifest's projection settings),
for every non-reference order:

    p_t = P theta_t (t < T),  p_T = P theta_T,     dp_a = p_{a+1} - p_a          [k]
    D_{a,l}  = safe((u_{a+1,l} - u_{a,l}) / dp_a),  D_{T-1} := D_{T-2}  (raw);
               then D_{a,l} <- clamp(eta_a D_{a,l}, 0, 1) / eta_a
    D2_{a,l} = safe((D_{a+1,l} - D_{a,l}) / dp_a), D2_{T-1} := D2_{T-2};
               then D2_{a,l} <- clamp(eta_a^2 D2_{a,l}, -1, 1) / eta_a^2
    d_0 = 0,  d_{t+1} = d_t - eta_t (u_{t,pi(t)} + D_{t,pi(t)} d_t [+ q_t] - u_{t,r(t)}),
              q_t = clamp(1/2 D2_{t,pi(t)} d_t^2, -|D_{t,pi(t)} d_t|, +|D_{t,pi(t)} d_t|)
    estimate_e = L_e(theta_T) + <P grad L_e(theta_T), d_T>

where safe(x / y) = 0 when |y| <= 1e-3 median |dp| (median over all anchors and coordinates,
torch's convention: the lower middle value), r = ``store.reference_order`` and eta_t the
Trainer's learning rate of window step t (a decaying schedule, so eta_t differs at every
step). With a constant learning rate and T = 3 the second-order term would be identically
zero (the D_{T-1} := D_{T-2} rule makes D2_{T-2} = 0, and d_0 = 0 at a = 0), so the check also
runs at T = 4, recorded around a non-identity reference order (which also catches a u_{t,r(t)}
read as u_{t,t}); ``test_fut2_second_order_term_is_active`` guards that D2 matters in both.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from currsearch.projection import Projector
from currsearch.record import record
from currsearch.train import Trainer
from estimators import get_estimator

K = 16  # projection dimension: small, so the coordinate loops below stay fast
REFERENCE = {3: None, 4: [2, 0, 3, 1]}  # T -> reference order of the recorded run (None: 0..T-1)


@pytest.fixture(scope="module", params=[3, 4], ids=["T3", "T4"])
def fut_store(request, tiny_cfg, tmp_path_factory):
    T = request.param
    # a decaying schedule, so that a step-size index error shows too (eta_t differs at every step)
    cfg = tiny_cfg.replace(data={"num_batches": T}, optim={"schedule": "warmup_cosine"},
                           record={"terms": ["updates"], "projection_dim": K})
    ref = None if REFERENCE[T] is None else torch.tensor(REFERENCE[T])
    store = record(cfg, tmp_path_factory.mktemp(f"fut{T}") / "s", progress=False, reference_order=ref)
    return store, hand_terms(store, cfg)


def _safe(num: float, den: float, floor: float) -> float:
    return num / den if abs(den) > floor else 0.0


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _lower_median(values: list[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]


def hand_terms(store, cfg):
    """u, clamped D and D2 ([T][T][k] nested lists), eta [T], readout [E][k], reference losses [E]."""
    T, m = store.T, store.manifest["projection"]
    assert store.anchors == list(range(T)), "the direct computation assumes an anchor at every step"
    proj = Projector(m["kind"], m["dim_in"], m["dim_out"], m["seed"], m["block"])
    thetas = [store.checkpoint(t)["theta"] for t in range(T)] + [store.final()["theta"]]
    p = [proj.project(th).double().tolist() for th in thetas]  # [T+1][k]
    u = store.get("update_proj").double().tolist()  # [A=T][T][k]
    trainer = Trainer.from_config(cfg)
    eta = [trainer.lr(t) for t in range(T)]
    k = len(p[0])
    dp = [[p[a + 1][j] - p[a][j] for j in range(k)] for a in range(T)]
    floor = 1e-3 * _lower_median([abs(x) for row in dp for x in row])

    raw = [[[_safe(u[a + 1][l][j] - u[a][l][j], dp[a][j], floor) for j in range(k)] for l in range(T)] for a in range(T - 1)]
    raw.append(raw[T - 2])  # the last anchor has no successor: it takes its predecessor's ratio
    D = [[[_clamp(eta[a] * raw[a][l][j], 0.0, 1.0) / eta[a] for j in range(k)] for l in range(T)] for a in range(T)]
    raw2 = [[[_safe(D[a + 1][l][j] - D[a][l][j], dp[a][j], floor) for j in range(k)] for l in range(T)] for a in range(T - 1)]
    raw2.append(raw2[T - 2])
    D2 = [[[_clamp(eta[a] ** 2 * raw2[a][l][j], -1.0, 1.0) / eta[a] ** 2 for j in range(k)] for l in range(T)] for a in range(T)]
    readout = store.final_eval_grads_proj().double().tolist()
    ref_loss = store.final()["eval_loss"].double().tolist()
    return u, D, D2, eta, readout, ref_loss


def hand_estimate(terms, order, ref_order, second: bool, curvature: bool = True) -> list[float]:
    """The recursion for one order, coordinate by coordinate; ``curvature=False`` drops D (and D2)."""
    u, D, D2, eta, readout, ref_loss = terms
    k = len(readout[0])
    d = [0.0] * k
    for t, (l, r) in enumerate(zip(order, ref_order)):
        for j in range(k):
            lin = D[t][l][j] * d[j] if curvature else 0.0
            step = u[t][l][j] + lin - u[t][r][j]
            if second and curvature:
                step += _clamp(0.5 * D2[t][l][j] * d[j] * d[j], -abs(lin), abs(lin))
            d[j] = d[j] - eta[t] * step
    return [ref_loss[e] + sum(readout[e][j] * d[j] for j in range(k)) for e in range(len(readout))]


@pytest.mark.parametrize("name", ["fut1", "fut2"])
def test_fut_equals_direct_computation(name, fut_store):
    store, terms = fut_store
    T, ref_order = store.T, store.reference_order.tolist()
    orders = [list(o) for o in itertools.permutations(range(T)) if list(o) != ref_order]
    u, D = terms[0], terms[1]
    # the fixture exercises the curvature: some coordinates of D are neither 0 nor clamped at 1 / eta
    eta = terms[3]
    assert len(set(eta)) == T  # the step sizes differ
    inner = [x for a in range(T) for row in D[a] for x in row if 0 < x * eta[a] < 1]
    assert len(inner) >= T * T * len(u[0][0]) // 10, f"only {len(inner)} unclamped curvature coordinates"

    est = get_estimator(name).fit(store).estimate(torch.tensor(orders))
    direct = torch.tensor([hand_estimate(terms, o, ref_order, second=name == "fut2") for o in orders], dtype=torch.float64)
    torch.testing.assert_close(est, direct, rtol=1e-12, atol=1e-10)
    # and the comparison is sharp: the curvature term moves the estimates far beyond the tolerance
    no_curv = torch.tensor([hand_estimate(terms, o, ref_order, second=False, curvature=False) for o in orders], dtype=torch.float64)
    assert (est - no_curv).abs().max() > 1e-6
    assert (est - store.final()["eval_loss"]).abs().max() > 1e-4  # the orders do move the estimate


def test_fut2_second_order_term_is_active(fut_store):
    store, _ = fut_store
    orders = torch.tensor(list(itertools.permutations(range(store.T))))
    gap = (get_estimator("fut2").fit(store).estimate(orders) - get_estimator("fut1").fit(store).estimate(orders)).abs().max()
    assert gap > 1e-6, f"fut2's quadratic term changes no estimate by more than {gap:.2g}: a wrong D2 would go unnoticed"
