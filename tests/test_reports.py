"""Typed results: one JSON form (to_json), read back (from_json), never mutated; reports render them."""

from __future__ import annotations

import copy
import json

import torch

from currsearch.reports.common import markdown_table
from currsearch.reports.verify import render_markdown
from currsearch.results import json_safe, to_json
from currsearch.trust_region import RoundCandidate, TrustRegionResult, TrustRegionRound
from currsearch.verify import RefinementSummary, VerificationResult, VerifiedCandidate, summarize, verify


def _result() -> VerificationResult:
    c = {"search_1": VerifiedCandidate("searched", [1, 0, 2], {"a": 1.0, "all": 2.0}, {"a": 1.1, "all": 2.1}, 0.5),
         "reference": VerifiedCandidate("reference", [0, 1, 2], {"a": 1.5, "all": 2.5}, None, 0.4),
         "random_0": VerifiedCandidate("random", [2, 1, 0], {"a": 1.7, "all": 2.7}, None, 0.4)}
    return VerificationResult(["a", "all"], ["a", "a", "a"], 3, c)


def test_verification_json_roundtrip_and_no_mutation():
    r = _result()
    before = copy.deepcopy(r)
    tr = RefinementSummary("search_1", 2.0, 1.9, 0.1, 2, 4, "fut1-hvp", "all")
    new = r.with_candidate("search_trust_region", VerifiedCandidate("searched", [0, 2, 1], {"a": 1.0, "all": 1.9}, None, 0.3), tr)
    assert r == before and "search_trust_region" not in r.candidates and r.trust_region is None
    js = json.loads(json.dumps(json_safe(new)))
    assert set(js) >= {"eval_names", "domains", "T", "candidates", "trust_region"}
    assert js["candidates"]["search_1"] == {"kind": "searched", "order": [1, 0, 2], "verified": {"a": 1.0, "all": 2.0},
                                            "estimated": {"a": 1.1, "all": 2.1}, "seconds": 0.5}
    assert VerificationResult.from_json(js) == new
    s = summarize(new)
    assert s.best_searched == "search_trust_region" and s.beats_random_median and s.beats_reference
    md = render_markdown(new, s)
    assert "| search_trust_region | searched |" in md and "random_0 (random median)" in md


def test_trust_region_round_roundtrip():
    x = TrustRegionRound(0, 4, [0, 1, 2], 2.0, 2.0, [RoundCandidate([1, 0, 2], 1.95, 1.97)], 0.05, 0.03, 0.6, True,
                         [1, 0, 2], 3, 1.97, {"record": 1.0, "search": 0.5, "verify": 0.2})
    js = json.loads(json.dumps(to_json([x])))
    assert js[0]["candidates"] == [{"order": [1, 0, 2], "estimated": 1.95, "verified": 1.97}]
    assert TrustRegionRound.from_json(js[0]) == x
    res = TrustRegionResult.from_rounds([x], "all", "fut1-hvp", 1.0)
    assert res.start_loss == 2.0 and res.incumbent_loss == 1.97 and res.verified_runs == 2


def test_to_json_tensors_and_nan():
    assert to_json({"t": torch.arange(3), "x": (1, 2.5)}) == {"t": [0, 1, 2], "x": [1, 2.5]}
    assert json_safe({"n": [float("nan"), 1.0]}) == {"n": [None, 1.0]}
    assert markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "| --- | --- |", "| 1 | 2 |"]


def test_verify_leaves_its_inputs_alone(tiny_trainer):
    T = tiny_trainer.T
    cands = {"reference": torch.arange(T), "search_1": torch.arange(T).flip(0)}
    ests = {"reference": torch.zeros(len(tiny_trainer.plan.eval_names), dtype=torch.float64)}
    keep_c, keep_e = copy.deepcopy(cands), copy.deepcopy(ests)
    r = verify(tiny_trainer, cands, ests)
    assert all(torch.equal(cands[k], keep_c[k]) for k in keep_c) and set(cands) == set(keep_c)
    assert torch.equal(ests["reference"], keep_e["reference"]) and set(ests) == {"reference"}
    assert r.candidates["search_1"].estimated is None and r.candidates["reference"].kind == "reference"
    assert VerificationResult.from_json(json.loads(json.dumps(to_json(r)))) == r


def test_ledger_counts_read_back_runs_with_their_seconds_and_names_untimed_ones():
    from currsearch.ledger import ComputeLedger
    from currsearch.reports.run import render_ledger

    led = ComputeLedger()
    led.add("record", 2.0, real_runs=1, equivalents=1.0)
    with led.phase("fit") as counts:  # 3 runs read back: 4.5 s recorded, one of them untimed
        counts["real_runs"] = counts["equivalents"] = 3
        counts["earlier_seconds"], counts["untimed_runs"] = 4.5, 1
    s = led.summary(run_seconds=1.5)
    fit = s.entries[1]
    assert fit.real_runs == 3 and fit.run_equivalents == 3.0 and fit.untimed_runs == 1 and 4.5 <= fit.seconds < 5.0
    assert s.seconds == 2.0 + fit.seconds and s.real_runs == 4
    md = render_ledger(s)
    assert "| fit | 3 | 3.0 | 4.5 |" in md and "1 of the real runs were read back from a cache written before" in md
    assert "read back" not in render_ledger(ComputeLedger([("record", 1, 2.0, 1.0, 0)]).summary(1.0))
