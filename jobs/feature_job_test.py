"""The real feature job on a real event log, Redis and Feast: exact values for a
hand-checked case, de-duplication, and a failure + restart from checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest

from features.online_store import FeatureClient

from features.progress import read_progress
from features.eventlog import open_configured_event_log
from core.events import Engagement, Exposure, Feedback, Followed, PostPublished
from runtime import stack

pytestmark = [pytest.mark.slow, pytest.mark.flink]
T = 1_767_571_200_000  # 2026-01-05


def exposure_event(eid: str, user: int, post: int, pos: int, ts: int) -> Exposure:
    return Exposure(event_id=eid, ts=ts, request_id=f"r{user}", user_id=user, post_id=post, author_id=11, position=pos,
                    feed_type="home", source="in_network")


def engagement_event(eid: str, user: int, post: int, action: str, ts: int, dwell: int | None = None) -> Engagement:
    return Engagement(event_id=eid, ts=ts, user_id=user, post_id=post, action=action, dwell_ms=dwell)


def wait_until(what, check, timeout: float = 90.0):
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


def _checkpoints(cfg) -> list[Path]:
    return sorted((cfg.data_dir / "flink" / "checkpoints").glob("*/*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime)


def test_features_job_exact_values_dedupe_and_restart(make_cfg):
    from jobs import feature_job as features

    cfg = make_cfg(FEEDRANK_FLINK_CHECKPOINT_INTERVAL_MS="1000", FEEDRANK_STREAMING_FLUSH_MS="100")
    stack.up(cfg)
    job = None
    try:
        log = open_configured_event_log(cfg)
        click1 = engagement_event("c1", 1, 7, "click", T + 1_000)
        log.append_many([
            PostPublished(event_id="pub7", ts=T, post_id=7, author_id=11, topic=3, content_type="video", text="red fox"),
            exposure_event("x1", 1, 7, 1, T + 100), exposure_event("x2", 2, 7, 2, T + 200), exposure_event("x3", 3, 7, 3, T + 300),
            click1, engagement_event("c2", 2, 7, "click", T + 2_000), engagement_event("l1", 1, 7, "like", T + 2_500),
            engagement_event("h3", 3, 7, "hide", T + 3_000), engagement_event("d2", 2, 7, "dwell", T + 4_000, dwell=40_000),
            engagement_event("d3", 3, 7, "dwell", T + 4_100, dwell=1_000), engagement_event("v3", 3, 7, "view", T + 4_200),
            Followed(event_id="f1", ts=T + 5_000, user_id=1, author_id=11),
            Feedback(event_id="fb3", ts=T + 5_100, user_id=3, action="see_less", target="topic", topic=5),
        ])
        log.append_lines([click1.to_json().encode(), b"{not json"])  # a producer retry and a corrupt line
        log.flush()
        job = features.run_embedded(cfg, fail_once_on="boom")
        client = FeatureClient(cfg)
        post_cols = [f"post_stats:{n}" for n in ("impressions", "clicks", "likes", "comments", "shares", "negatives",
                                                 "long_dwells", "clicks_5m", "clicks_1h", "ctr")]

        def post7() -> dict:
            got = client.posts([7], post_cols)
            return got if got["impressions"][0] == 3 and got["clicks"][0] == 2 and got["long_dwells"][0] == 1 else {}

        got = wait_until("post 7 stats", post7)
        assert [got[k][0] for k in ("impressions", "clicks", "likes", "comments", "shares", "negatives", "long_dwells",
                                    "clicks_5m", "clicks_1h")] == [3, 2, 1, 0, 0, 1, 1, 2, 2]
        assert got["ctr"][0] == pytest.approx((2 + 2) / (3 + 20))

        u1 = wait_until("user 1", lambda: (lambda u: u if u["clicks"] == 1 else None)(client.user(1)))
        assert u1["topic_clicks"][3] == pytest.approx(1.0) and sum(u1["topic_clicks"]) == pytest.approx(1.0)
        assert u1["ctype_clicks"] == pytest.approx([0.0, 0.0, 1.0])  # video
        # the hide of post 7 (topic 3) and the topic-level "see less" of topic 5 (a Feedback event)
        u3 = wait_until("user 3", lambda: (lambda u: u if u["negatives"] == 2 else None)(client.user(3)))
        assert u3["topic_negative"][3] == pytest.approx(0.5) and u3["topic_negative"][5] == pytest.approx(0.5)
        assert u3["clicks"] == 0
        # views keep the session, likes the recent likes: through Feast's own read of the user_session view
        sess_cols = [f"user_session:{n}" for n in ("viewed_posts", "liked_posts", "session_start_ms", "last_view_ms",
                                                    "session_depth")]

        def session(user: int, ready: Callable[[dict], bool]) -> dict | None:
            row = {k: v[0] for k, v in client.store.get_online_features(sess_cols, entity_rows=[{"user_id": user}]).to_dict().items()}
            return row if ready(row) else None

        s3 = wait_until("user 3 session", lambda: session(3, lambda r: r["session_depth"] == 1))
        assert s3["viewed_posts"] == [7] and s3["session_start_ms"] == s3["last_view_ms"] == T + 4_200 and not s3["liked_posts"]
        s1 = wait_until("user 1 likes", lambda: session(1, lambda r: r["liked_posts"] == [7]))
        assert s1["session_depth"] == 0 and not s1["viewed_posts"]
        topic = wait_until("topic 3", lambda: (lambda t: t if t["clicks_5m"][0] == 2 else None)(
            client.store.get_online_features(["topic_stats:clicks_5m", "topic_stats:clicks_1h"],
                                             entity_rows=[{"topic_id": 3}]).to_dict()))
        assert topic["clicks_1h"][0] == 2
        prog = wait_until("dedupe counts", lambda: (lambda p: p if p.get("dedupe_invalid") == 1 else None)(
            read_progress(cfg, "features")))
        assert prog["dedupe_duplicates"] == 1

        # a checkpoint that holds all of the above, then more events with a failure in the middle
        seen = time.time()
        wait_until("a checkpoint after phase 1", lambda: [p for p in _checkpoints(cfg) if p.stat().st_mtime > seen + 1])
        log.append_many([exposure_event(f"y{i}", 10 + i, 7, 4, T + 10_000 + i) for i in range(4)]
                        + [engagement_event("c4", 4, 7, "click", T + 11_000), exposure_event("boom", 20, 7, 5, T + 12_000)]
                        + [exposure_event(f"z{i}", 30 + i, 7, 6, T + 13_000 + i) for i in range(2)]
                        + [exposure_event("x1", 1, 7, 1, T + 100)])  # a repeat of a phase-1 id
        log.flush()
        got = wait_until("post 7 after the restart", lambda: (lambda g: g if g["impressions"][0] >= 10 else None)(
            client.posts([7], post_cols)))
        assert (cfg.data_dir / "flink" / "fault-boom.done").exists(), "the injected failure did not fire"
        time.sleep(3)  # anything double counted by the replay would show up by now
        got = client.posts([7], post_cols)
        assert got["impressions"][0] == 3 + 4 + 1 + 2 and got["clicks"][0] == 3
        assert read_progress(cfg, "features")["post_opened"] >= 2, "the operator was not restarted"
    finally:
        if job is not None:
            job.cancel().result()
        stack.down(cfg)
