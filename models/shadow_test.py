"""Shadow scoring decisions on a lake with known answers: pages both models scored and the clicks that
followed (a real Redis for the control key and the decisions, a real model store): a better candidate is
promoted, a worse one rejected, and nothing is decided before the window is over."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.events import Engagement, FeaturesServed, ShadowScored
from features import lake
from features.connection import redis_client
from models import shadow
from models.store import ModelStore
from runtime import stack

pytestmark = pytest.mark.slow
T = 1_767_571_200_000  # 2026-01-05


def _seed(cfg, candidate: str, noise: float, seed: int, t0: int, pages: int = 150) -> None:
    """Pages of 10 posts; a post's true appeal drives its click; the serving model sees it with noise 1.0,
    the candidate with ``noise``."""
    rng = np.random.default_rng(seed)
    rows, engs = [], []
    for i in range(pages):
        u, ts = 1000 * seed + i, t0 + i * 1000
        posts = list(range(i * 10, i * 10 + 10))
        appeal = rng.normal(size=10)
        cur = np.repeat((appeal + rng.normal(scale=1.0, size=10))[:, None], 6, axis=1) * 0.1 + 0.5
        cand = np.repeat((appeal + rng.normal(scale=noise, size=10))[:, None], 6, axis=1) * 0.1 + 0.5
        ev = ShadowScored(event_id=f"s{seed}-{i}", ts=ts, request_id=f"r{seed}-{i}", user_id=u, post_ids=posts,
                          positions=list(range(1, 11)), current_version="cur", candidate_version=candidate,
                          current=FeaturesServed.encode_rows(cur), candidate=FeaturesServed.encode_rows(cand))
        rows.append(lake.row_of("shadow_scores", ev))
        for p, a in zip(posts, appeal):
            if rng.random() < 1 / (1 + np.exp(-(2 * a - 1))):
                engs.append(Engagement(event_id=f"c{seed}-{u}-{p}", ts=ts + 5_000, user_id=u, post_id=p, action="click"))
    lake.write_rows(cfg, "shadow_scores", rows)
    lake.write_rows(cfg, "engagements", [lake.row_of("engagements", e) for e in engs])


def test_better_candidate_promoted_worse_rejected_nothing_before_the_window(make_cfg):
    cfg = make_cfg(FEEDRANK_SHADOW_WINDOW_S="600", FEEDRANK_SHADOW_MIN_PAGES="100")
    stack.up(cfg)
    try:
        store = ModelStore.from_config(cfg)
        cur = store.publish("heavy", {"w": b"0"}, promote=True, extra={"examination_curve": [1.0, 0.8, 0.6, 0.5]}).version
        good = store.publish("heavy", {"w": b"1"}).version
        bad = store.publish("heavy", {"w": b"2"}).version
        with pytest.raises(shadow.ShadowError, match="already the current"):
            shadow.start(cfg, store, cur)
        with pytest.raises(shadow.ShadowError, match="no version"):
            shadow.start(cfg, store, "nope")

        shadow.start(cfg, store, good, now_ms=T)
        _seed(cfg, good, noise=0.2, seed=1, t0=T + 1000)
        early = shadow.status(cfg, store, now_ms=T + 300_000)
        assert early["decision"] == "waiting" and shadow.active(cfg)["version"] == good
        res = shadow.status(cfg, store, now_ms=T + 700_000)
        click = res["heads"]["click"]
        assert res["pages"] == 150 and res["items"] == 1500 and click["compared"] and not res["heads"]["like"]["compared"]
        assert click["auc_candidate"] > click["auc_current"] + 0.05, res
        assert res["ndcg"]["candidate"] > res["ndcg"]["current"] and res["ndcg"]["pages"] > 50
        assert res["decision"] == "promote", res
        assert store.current("heavy") == good and shadow.active(cfg) is None

        shadow.start(cfg, store, bad, now_ms=T + 1_000_000)
        _seed(cfg, bad, noise=3.0, seed=2, t0=T + 1_001_000)
        res = shadow.status(cfg, store, now_ms=T + 1_700_000)
        assert res["pages"] == 150 and res["decision"] == "reject", res
        assert any(r.startswith("click AUC") for r in res["reasons"])
        assert store.current("heavy") == good and shadow.active(cfg) is None
        r = redis_client(cfg)
        assert {k.decode(): int(v) for k, v in r.hgetall(shadow.DECISION_COUNTS).items()} == {"promote": 1, "reject": 1}
        logged = [json.loads(x) for x in r.lrange(shadow.DECISIONS, 0, -1)]
        assert [d["decision"] for d in logged] == ["promote", "reject"] and logged[1]["candidate"] == bad
    finally:
        stack.down(cfg)
