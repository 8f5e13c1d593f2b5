"""The training-set pipeline (Apache Beam, DirectRunner in 2 processes) on a lake written in the lake
job's format: attribution by request and by time window, labels per head, the served rows bit for bit,
negatives sampled with the weights that undo it, a time-based split, missing rows counted."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.events import Engagement, FeaturesServed
from core.schema import HEAD_NAMES
from features import lake
from jobs import training_set as ts
from jobs.feature_job_test import T, exposure_event

pytestmark = pytest.mark.slow
MIN = 60_000


def _page(rid, user, posts, t, rows=True, logged=True):
    sid = f"{rid}:1" if rows else None
    exps = [exposure_event(f"{rid}-{p}", user, p, i + 1, t).model_copy(update={"request_id": rid, "snapshot_id": sid})
            for i, p in enumerate(posts)]
    x = np.random.default_rng(len(rid) + user).normal(size=(len(posts), 5)).astype(np.float32)
    fs = FeaturesServed(event_id=f"fs-{rid}", ts=t, request_id=rid, snapshot_id=f"{rid}:1", user_id=user,
                        post_ids=posts, feature_schema="h5", n_features=5, rows=FeaturesServed.encode_rows(x))
    return exps, ([fs] if rows and logged else []), x


def _eng(eid, user, post, action, t, dwell=None, request_id=None):
    return Engagement(event_id=eid, ts=t, user_id=user, post_id=post, action=action, dwell_ms=dwell, request_id=request_id)


def test_training_set_labels_rows_sampling_split(make_cfg):
    cfg = make_cfg()
    pages = {"r1": _page("r1", 1, [7, 8, 9], T), "r2": _page("r2", 1, [7, 10], T + 10 * MIN),
             "r3": _page("r3", 2, [7], T + 11 * MIN, rows=False),           # served without rows
             "r4": _page("r4", 3, [11], T + 12 * MIN, logged=False),        # rows never reached the lake
             "r5": _page("r5", 4, list(range(100, 160)), T + 20 * MIN),     # 60 negatives
             "r6": _page("r6", 5, [12, 13], T + 60 * MIN)}                  # the latest: validation
    exps = [e for p in pages.values() for e in p[0]]
    served = [f for p in pages.values() for f in p[1]]
    engs = [_eng("c1", 1, 7, "click", T + MIN),                       # -> r1's 7 (latest exposure before it)
            _eng("d1", 1, 8, "dwell", T + 5 * MIN, dwell=40_000),     # -> r1's 8: long dwell
            _eng("l1", 1, 7, "like", T + 11 * MIN),                   # -> r2's 7 (the later exposure)
            _eng("s1", 1, 7, "share", T + 12 * MIN, request_id="r1"),  # -> r1's 7: its request says so
            _eng("c9", 1, 9, "click", T + 40 * MIN),                  # 40 min after: outside the 30 min window
            _eng("h6", 5, 12, "hide", T + 61 * MIN), _eng("c6", 5, 13, "click", T + 61 * MIN)]
    lake.write_rows(cfg, "exposures", [lake.row_of("exposures", e) for e in exps])
    lake.write_rows(cfg, "features_served", [lake.row_of("features_served", f) for f in served])
    lake.write_rows(cfg, "engagements", [lake.row_of("engagements", e) for e in engs])
    lake.write_rows(cfg, "engagements", [lake.row_of("engagements", engs[0])], writer="retry")  # a repeat of c1

    meta = ts.run(cfg, "2026-01-05", 1, workers=1)
    c = meta["counts"]
    assert c["exposures"] == len(exps) == 69
    assert c["served_without_features"] == 1 and c["missing_features"] == 1
    assert c["examples_positive"] == 4 and c["examples_negative"] == 63
    out = ts.out_dir(cfg, "2026-01-05", 1)
    assert json.loads((out / "_meta.json").read_text()) == meta
    read = lambda s: pq.read_table(sorted((out / s).glob("*.parquet"))).to_pylist()  # noqa: E731
    train, valid = read("train"), read("validation")
    rows = {r["event_id"]: r for r in train + valid}
    labels = lambda eid: tuple(rows[eid][h] for h in HEAD_NAMES)  # noqa: E731
    assert labels("r1-7") == (1, 0, 0, 1, 0, 0)   # click + share (by request), not the like
    assert labels("r2-7") == (0, 1, 0, 0, 0, 0)
    assert labels("r1-8") == (0, 0, 0, 0, 1, 0)
    assert labels("r6-13") == (1, 0, 0, 0, 0, 0)
    assert "r6-12" not in rows or labels("r6-12") == (0, 0, 0, 0, 0, 1)  # a negative: sampled
    assert "r3-7" not in rows and "r4-11" not in rows
    for rid in ("r1", "r2", "r5", "r6"):  # the served rows, bit for bit
        x, posts = pages[rid][2], [e.post_id for e in pages[rid][0]]
        for i, p in enumerate(posts):
            if f"{rid}-{p}" in rows:
                assert np.array_equal(np.array(rows[f"{rid}-{p}"]["x"], dtype=np.float32), x[i])
                assert rows[f"{rid}-{p}"]["feature_schema"] == "h5" and rows[f"{rid}-{p}"]["position"] == i + 1
    # negatives: kept at rate min(1, 10 x 4 / 63) by a hash of the event id, weighted 1/rate
    rate = 10 * 4 / 63
    negs = [e.event_id for e in exps if e.snapshot_id and e.request_id != "r4" and e.event_id not in ("r1-7", "r2-7", "r1-8", "r6-13")]
    assert len(negs) == 63
    kept = sorted(n for n in negs if ts.keep_fraction(n) < rate)
    assert sorted(k for k, r in rows.items() if not ts.positive(r)) == kept and 0 < len(kept) < 63
    assert all(rows[k]["weight"] == pytest.approx(1 / rate) for k in kept)
    assert all(r["weight"] == 1.0 for r in rows.values() if ts.positive(r))
    assert meta["counts"]["kept_negative"] == len(kept) and meta["counts"]["kept_positive"] == 4
    # time split: the latest 20% of the span (T .. T+60 min) is validation
    assert {r["event_id"] for r in valid} == {k for k in rows if k.startswith("r6-")}
    assert "r6-13" in {r["event_id"] for r in valid}
    assert meta["splits"]["train"]["rows"] == len(train) and meta["splits"]["validation"]["rows"] == len(valid)
    assert meta["splits"]["train"]["feature_schemas"] == ["h5"]


def test_a_run_that_lost_elements_is_an_error():
    ok = {"exposures": 10, "examples_positive": 3, "examples_negative": 6, "missing_features": 1, "kept_positive": 3}
    ts.check_complete(ok)
    with pytest.raises(ts.IncompleteRun, match="10 exposures -> 8 after the row join"):
        ts.check_complete({**ok, "examples_negative": 4})
    with pytest.raises(ts.IncompleteRun, match="3 positives -> 2 after sampling"):
        ts.check_complete({**ok, "kept_positive": 2})
