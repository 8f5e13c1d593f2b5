"""The batch features pipeline (Apache Beam) on a seeded lake: a user's 30-day interest and an author's
quality with known answers, written as the Feast offline sources and materialised into the online store
(a real Redis), where Feast reads them back."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from core.events import Engagement, Followed, PostPublished, Unfollowed
from features import lake
from features.feast_repo import feature_store
from features.connection import redis_client
from features.vectors import rate
from jobs import batch_features
from jobs.feature_job_test import T, exposure_event
from runtime import stack

pytestmark = pytest.mark.slow
DAY = 86_400_000


def test_interest_and_author_quality_reach_the_online_store(make_cfg):
    cfg = make_cfg()
    posts = [PostPublished(event_id=f"p{i}", ts=T - 40 * DAY + i, post_id=i, author_id=100 + i % 2, topic=i % 3,
                           content_type=("text", "video")[i % 2]) for i in range(6)]  # older than the window: still known
    exps = [exposure_event(f"x{u}-{p}", u, p, 1, T + u).model_copy(update={"author_id": 100 + p % 2}) for u in (1, 2) for p in range(6)]
    engs = [Engagement(event_id="c1", ts=T + 10, user_id=1, post_id=0, action="click"),       # author 100, topic 0, text
            Engagement(event_id="l1", ts=T + 11, user_id=1, post_id=2, action="like"),        # author 100, topic 2, text
            Engagement(event_id="d1", ts=T + 12, user_id=1, post_id=3, action="dwell", dwell_ms=60_000),  # 101, topic 0, video
            Engagement(event_id="d2", ts=T + 13, user_id=1, post_id=5, action="dwell", dwell_ms=1_000),   # short: not positive
            Engagement(event_id="h2", ts=T + 14, user_id=2, post_id=1, action="hide"),        # author 101
            Engagement(event_id="c2", ts=T + 15, user_id=2, post_id=4, action="click"),       # author 100, topic 1
            Engagement(event_id="old", ts=T - 31 * DAY, user_id=1, post_id=1, action="click")]  # before the 30 days
    follows = [Followed(event_id="f1", ts=T, user_id=1, author_id=100), Followed(event_id="f2", ts=T, user_id=2, author_id=100),
               Unfollowed(event_id="u2", ts=T + 1, user_id=2, author_id=100), Followed(event_id="f3", ts=T, user_id=1, author_id=101)]
    for table, evs in (("posts", posts), ("exposures", exps), ("engagements", engs), ("follows", follows)):
        lake.write_rows(cfg, table, [lake.row_of(table, e) for e in evs])
    lake.write_rows(cfg, "engagements", [lake.row_of("engagements", engs[0])], writer="retry")  # a repeat
    stack.up(cfg)
    try:
        res = batch_features.run(cfg, "2026-01-05", workers=1)
        assert res["user_interest"]["rows"] == 2 and res["author_stats"]["rows"] == 2
        ui = {r["user_id"]: r for r in pq.read_table(res["user_interest"]["path"]).to_pylist()}
        u1 = ui[1]
        assert u1["positive_engagements"] == 3 and u1["negative_feedback"] == 0
        assert u1["topic_interest"][:3] == pytest.approx([2 / 3, 0, 1 / 3])
        assert u1["ctype_interest"] == pytest.approx([2 / 3, 0, 1 / 3])  # text, image, video
        assert u1["top_authors"] == [100, 101] and u1["top_author_share"] == pytest.approx([2 / 3, 1 / 3])
        assert ui[2]["positive_engagements"] == 1 and ui[2]["negative_feedback"] == 1
        au = {r["author_id"]: r for r in pq.read_table(res["author_stats"]["path"]).to_pylist()}
        assert (au[100]["impressions"], au[100]["clicks"], au[100]["negatives"], au[100]["followers"]) == (6, 2, 0, 1)
        assert (au[101]["impressions"], au[101]["clicks"], au[101]["negatives"], au[101]["followers"]) == (6, 0, 1, 1)
        assert au[100]["ctr"] == pytest.approx(float(rate(2, 6)))
        got = feature_store(cfg).get_online_features(
            features=["author_stats:ctr", "author_stats:impressions", "user_interest:top_authors"],
            entity_rows=[{"author_id": 100, "user_id": 1}]).to_dict()
        assert got["impressions"] == [6] and got["ctr"][0] == pytest.approx(float(rate(2, 6)), rel=1e-6)
        assert got["top_authors"] == [[100, 101]]
        assert redis_client(cfg).get("feedrank:batch:features").decode().startswith("2026-01-05:")
    finally:
        stack.down(cfg)
