"""The lake job on a real Kafka broker: every event type lands in its Parquet table with exact values
(the served feature rows bit for bit), partitioned by event date and hour; then a SIGKILL of the job's
JVM and a resume from the retained checkpoint: every event in the lake exactly once."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timezone
import time

import numpy as np
import pytest

from core.events import Engagement, FeaturesServed, Feedback, Followed, PostPublished, ShadowScored, Unfollowed
from core.services import free_port
from features import lake
from features.eventlog import open_configured_event_log
from features.progress import read_progress
from jobs import flinkenv
from jobs.feature_job_kafka_test import _kill_jvm, _start_job
from jobs.feature_job_test import T, engagement_event, exposure_event, wait_until
from runtime import stack

pytestmark = [pytest.mark.slow, pytest.mark.flink, pytest.mark.kafka]


def _page(rid: str, user: int, posts: list[int], ts: int, seed: int) -> tuple[FeaturesServed, list, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(len(posts), 7)).astype(np.float32)
    sid = f"{rid}:1"
    fs = FeaturesServed(event_id=f"fs-{rid}", ts=ts, request_id=rid, snapshot_id=sid, user_id=user, post_ids=posts,
                        feature_schema="abc", n_features=7, rows=FeaturesServed.encode_rows(x))
    exps = [exposure_event(f"{rid}-{i}", user, p, i + 1, ts).model_copy(update={"snapshot_id": sid, "request_id": rid})
            for i, p in enumerate(posts)]
    return fs, exps, x


def _lake_job(cfg, job_log, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update({"FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir), "FEEDRANK_REDIS": cfg.redis.uri,
                "FEEDRANK_FLINK_REST_PORT": str(cfg.flink.rest_port), "FEEDRANK_EVENTS": cfg.events.uri,
                "FEEDRANK_LAKE_URI": cfg.lake.uri, "FEEDRANK_MODEL_STORE": cfg.model_store.uri, **(extra or {})})
    return _start_job(env, job_log, "lake")


def _count(cfg, table: str, unique: bool = False) -> int:
    return lake.read_table(cfg, table, unique=unique).num_rows


def test_lake_exact_rows_partitions_then_kill_9_and_resume_exactly_once(make_cfg, tmp_path):
    over = dict(FEEDRANK_EVENTS=f"kafka://127.0.0.1:{free_port()}/engagements", FEEDRANK_EVENTS_KAFKA_PARTITIONS="4",
                FEEDRANK_FLINK_CHECKPOINT_INTERVAL_MS="2000")
    cfg = make_cfg(**over)
    job_log = tmp_path / "lake.log"
    stack.up(cfg)
    proc = None
    try:
        log = open_configured_event_log(cfg)
        hour = 3_600_000
        fs1, exps1, x1 = _page("r1", 1, [7, 8, 9], T + 100, 0)
        fs2, exps2, x2 = _page("r2", 2, [8, 7], T + hour + 5, 1)  # the next hour's partition
        phase1 = [
            PostPublished(event_id="pub7", ts=T, post_id=7, author_id=11, topic=3, content_type="video", text="red fox"),
            PostPublished(event_id="pub8", ts=T + 1, post_id=8, author_id=12, topic=4, content_type="text",
                          is_original=False, original_post_id=7),
            Followed(event_id="f1", ts=T + 2, user_id=1, author_id=11), Unfollowed(event_id="u1", ts=T + 3, user_id=1, author_id=11),
            Feedback(event_id="fb1", ts=T + 4, user_id=2, action="see_less", target="topic", topic=4),
            fs1, *exps1, fs2, *exps2,
            ShadowScored(event_id="sh1", ts=T + 100, request_id="r1", user_id=1, post_ids=[7, 8, 9], positions=[1, 2, 3],
                         current_version="v1", candidate_version="v2", current=FeaturesServed.encode_rows(np.ones((3, 6))),
                         candidate=FeaturesServed.encode_rows(np.full((3, 6), 0.5))),
            engagement_event("c1", 1, 7, "click", T + 1_000), engagement_event("d1", 1, 8, "dwell", T + 2_000, dwell=40_000),
        ]
        log.append_many(phase1)
        log.append(engagement_event("c1", 1, 7, "click", T + 1_000))  # a producer retry: the same event id again
        proc = _lake_job(cfg, job_log)
        want = {"posts": 2, "follows": 2, "feedback": 1, "features_served": 2, "exposures": 5, "engagements": 3,
                "shadow_scores": 1}
        wait_until("phase 1 in the lake", lambda: all(_count(cfg, t) >= n for t, n in want.items()), timeout=240)
        time.sleep(3)  # one more checkpoint: nothing more may appear
        assert {t: _count(cfg, t) for t in want} == want

        fs = lake.read_table(cfg, "features_served").to_pylist()
        by = {r["snapshot_id"]: r for r in fs}
        for page, x in ((fs1, x1), (fs2, x2)):
            r = by[page.snapshot_id]
            assert r["post_ids"] == page.post_ids and r["n_features"] == 7 and r["feature_schema"] == "abc"
            assert np.array_equal(FeaturesServed.decode_rows(r["rows"], 7), x)  # bit for bit
        assert (by["r1:1"]["dt"], by["r1:1"]["hr"]) == lake.partition(T + 100) == ("2026-01-05", "00")
        assert by["r2:1"]["hr"] == "01"
        assert {p.name for p in (lake.lake_dir(cfg) / "exposures" / "dt=2026-01-05").iterdir()} == {"hr=00", "hr=01"}
        ex = {r["event_id"]: r for r in lake.read_table(cfg, "exposures").to_pylist()}
        assert ex["r1-2"]["post_id"] == 9 and ex["r1-2"]["position"] == 3 and ex["r1-2"]["snapshot_id"] == "r1:1"
        assert ex["r1-2"]["feed_type"] == "home" and ex["r1-2"]["experiments"] == "{}"
        assert str(ex["r1-2"]["event_time"]) == "2026-01-05 00:00:00.100000"
        posts = {r["post_id"]: r for r in lake.read_table(cfg, "posts").to_pylist()}
        assert posts[8]["original_post_id"] == 7 and posts[8]["is_original"] is False and posts[7]["text"] == "red fox"
        assert sorted(r["followed"] for r in lake.read_table(cfg, "follows").to_pylist()) == [False, True]
        eng = lake.read_table(cfg, "engagements")
        assert eng.num_rows == 2 and _count(cfg, "engagements") == 3  # the retry, dropped by the reader
        assert {r["event_id"]: r["dwell_ms"] for r in eng.to_pylist()} == {"c1": None, "d1": 40_000}
        assert lake.read_table(cfg, "feedback").to_pylist()[0]["topic"] == 4
        sh = lake.read_table(cfg, "shadow_scores").to_pylist()[0]
        assert sh["positions"] == [1, 2, 3] and sh["candidate_version"] == "v2"
        assert np.array_equal(FeaturesServed.decode_rows(sh["candidate"], 6), np.full((3, 6), 0.5, dtype=np.float32))

        # phase 2 processed and committed, phase 3 processed but maybe not, then kill -9
        log.append_many([exposure_event(f"y{i}", 10 + i, 7, 4, T + 10_000 + i) for i in range(40)])
        wait_until("phase 2", lambda: _count(cfg, "exposures") >= 45)
        log.append_many([exposure_event(f"z{i}", 30 + i, 7, 6, T + 13_000 + i) for i in range(40)])
        wait_until("phase 3 read", lambda: read_progress(cfg, "lake").get("exposures", 0) >= 85, timeout=60)
        _kill_jvm(proc)
        proc = None
        log.append_many([exposure_event(f"w{i}", 50 + i, 7, 8, T + 20_000 + i) for i in range(40)])  # while it is down
        restored = flinkenv.latest_checkpoint(cfg, "lake")
        assert restored is not None
        proc = _lake_job(cfg, job_log)
        wait_until("the resumed job", lambda: _count(cfg, "exposures") >= 125, timeout=240)
        time.sleep(5)
        raw = lake.read_table(cfg, "exposures", unique=False)
        ids = raw.column("event_id").to_pylist()
        assert len(ids) == 125 and len(set(ids)) == 125, "every exposure exactly once across the kill"
        assert f"resuming from checkpoint {restored}" in job_log.read_text()
        assert _count(cfg, "features_served") == 2 and _count(cfg, "posts") == 2
        # compacted (Flink's part files have no extension) and read through Feast's file offline store
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        proc = None
        c = lake.compact(cfg, min_age_s=0)
        assert c["repeats_dropped"] == 1 and c["rows"] >= 125 + 2 + 2  # the engagement retry (c1 twice)
        from feast.infra.offline_stores.dask import DaskOfflineStore

        from features.feast_repo import definitions, feature_store

        job = DaskOfflineStore.pull_all_from_table_or_query(
            config=feature_store(cfg).config, data_source=definitions(cfg.data_dir, lake.lake_dir(cfg))["lake_exposures"],
            join_key_columns=["user_id"], feature_name_columns=["event_id", "post_id", "position"],
            timestamp_field="event_time", start_date=datetime.fromtimestamp(T / 1000 - 3600, tz=timezone.utc),
            end_date=datetime.fromtimestamp(T / 1000 + 86_400, tz=timezone.utc))
        assert sorted(job.to_df()["event_id"]) == sorted(ids)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        stack.down(cfg)
