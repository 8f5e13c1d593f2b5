"""The runner's contracts without a server: column checks at construction, source failure policies,
side effects' failure handling."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from core.config import load_config
from serving.components import Candidates, CandidateSource, Query, SideEffect, UserContext
from serving.funnel import Pipeline, PipelineError, SourceUnavailable, fetch_candidates, run_side_effects
from serving.hydrators import HeavyFeatureHydrator, LightFeatureHydrator
from serving.scorers import HeavyRankerScorer, LightRankerScorer


class Ids(CandidateSource):
    writes = ("ann",)

    def __init__(self, ids: list[int], fail_open: bool = True):
        super().__init__(fail_open)
        self.ids = ids

    def fetch(self, query, ctx):
        return Candidates(np.array(self.ids), np.ones(len(self.ids)), ann=np.zeros(len(self.ids), dtype=np.float32))


class Broken(CandidateSource):
    def fetch(self, query, ctx):
        raise ConnectionError("backend down")


class Failing(SideEffect):
    def apply(self, ctx, payload):
        raise OSError("disk full")


def _query() -> Query:
    q = Query(request_id="r", user_id=1, feed_type="home", now_ms=0, limit=20, params=None, experiments={},
              deadline=time.monotonic() + 5)
    q.user = UserContext(user_id=1)
    return q


def _ctx():
    return SimpleNamespace(cfg=load_config({}))


def test_a_read_nothing_upstream_writes_is_refused_at_construction_naming_component_and_column():
    with pytest.raises(PipelineError, match="HOME: HeavyRankerScorer reads column 'x'"):
        Pipeline("HOME", [], [Ids([1])], [], [LightFeatureHydrator(), LightRankerScorer(), HeavyRankerScorer()])
    with pytest.raises(PipelineError, match="LightFeatureHydrator reads column 'ann'"):
        Pipeline("BARE", [], [Broken()], [], [LightFeatureHydrator()])
    Pipeline("OK", [], [Ids([1])], [], [LightFeatureHydrator(), HeavyFeatureHydrator(), HeavyRankerScorer()])


def test_a_fail_open_source_is_left_out_and_flagged_a_fail_closed_one_fails_the_request():
    q = _query()
    got = fetch_candidates(Pipeline("P", [], [Ids([4, 5]), Broken()], [], []), q, _ctx())
    assert got.ids.tolist() == [4, 5] and q.degraded == ["source_error:Broken"]
    assert q.executed == ["source Ids", "source Broken"]
    with pytest.raises(SourceUnavailable, match="Broken failed: backend down"):
        fetch_candidates(Pipeline("P", [], [Ids([4, 5]), Broken(fail_open=False)], [], []), _query(), _ctx())


def test_a_failing_synchronous_side_effect_degrades_the_response_and_the_next_one_still_runs():
    q = _query()
    submitted = []
    p = Pipeline("P", [], [Ids([1])], [], [], [Failing(), AsyncNoop()])
    run_side_effects(p, q, _ctx(), Candidates.empty(), lambda e, qq, page: submitted.append(e.name))
    assert q.degraded == ["side_effect_error:Failing"] and submitted == ["AsyncNoop"]
    assert q.executed == ["side_effect Failing", "side_effect AsyncNoop"]


class AsyncNoop(SideEffect):
    asynchronous = True

    def apply(self, ctx, payload):
        return 0
