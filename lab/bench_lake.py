"""`feedrank bench lake`: the lake job's throughput (events/s, MB/s) and the Beam training-set pipeline's
rows/s on the DirectRunner, on their own embedded stack.

The workload is served pages as serving logs them: per page one ``features_served`` event (20 rows x the
heavy features, ~33 KB of JSON), 20 exposures and the engagements that followed (a click and a dwell on
about one item in five, a like on one in twenty), plus the pages' posts. Written to the event log first;
the lake job then reads it as fast as it can; its rate is measured from its first progress count to the
last event committed to Parquet (start-up reported apart).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from core.config import Config
from core.schema import HEAVY_FEATURES

T0 = 1_767_571_200_000  # 2026-01-05 00:00 UTC: one day of pages
DATE = "2026-01-05"


def lake_workload(pages: int, seed: int = 0) -> tuple[list[Any], int]:
    """(events, exposures) of ``pages`` served pages over one day."""
    from core.events import Engagement, Exposure, FeaturesServed, PostPublished
    from core.schema import schema_hash

    rng = np.random.default_rng(seed)
    h = schema_hash(HEAVY_FEATURES)
    n_posts = max(1000, pages * 2)
    events: list[Any] = [PostPublished(event_id=f"p{p}", ts=T0, post_id=p, author_id=p % 500, topic=p % 24,
                                       content_type="text") for p in range(n_posts)]
    exposures = 0
    for i in range(pages):
        ts, user, rid = T0 + int(i * 86_000_000 / pages), int(rng.integers(0, 10_000)), f"b{i}"
        posts = rng.choice(n_posts, size=20, replace=False).tolist()
        x = rng.normal(size=(20, len(HEAVY_FEATURES))).astype(np.float32)
        events.append(FeaturesServed(event_id=f"f{i}", ts=ts, request_id=rid, snapshot_id=f"{rid}:1", user_id=user,
                                     post_ids=posts, feature_schema=h, n_features=x.shape[1],
                                     rows=FeaturesServed.encode_rows(x)))
        for pos, p in enumerate(posts, 1):
            events.append(Exposure(event_id=f"x{i}-{pos}", ts=ts, request_id=rid, user_id=user, post_id=p, author_id=p % 500,
                                   position=pos, feed_type="home", source="in_network", snapshot_id=f"{rid}:1"))
            exposures += 1
            r = rng.random()
            if r < 0.2:
                events.append(Engagement(event_id=f"c{i}-{pos}", ts=ts + 3_000, user_id=user, post_id=p, action="click"))
                events.append(Engagement(event_id=f"d{i}-{pos}", ts=ts + 9_000, user_id=user, post_id=p, action="dwell",
                                         dwell_ms=int(rng.integers(1_000, 90_000))))
            if r < 0.05:
                events.append(Engagement(event_id=f"l{i}-{pos}", ts=ts + 10_000, user_id=user, post_id=p, action="like"))
    return events, exposures


def bench_lake(cfg: Config, pages: int = 3000, events: str = "kafka", workers: int = 1, progress=None) -> dict[str, Any]:
    from features import lake
    from features.eventlog import open_configured_event_log
    from features.progress import read_progress
    from jobs import lake as lake_job
    from jobs import training_set
    from lab.bench import event_log_info, isolated_config
    from runtime import stack

    step = progress or (lambda s, f: None)
    bcfg = isolated_config(cfg, "lake", events)
    bcfg = bcfg.model_copy(update={"lake": bcfg.lake.model_copy(update={"uri": "file://" + str(bcfg.data_dir / "lake")})})
    evs, n_exp = lake_workload(pages)
    n = len(evs)
    stack.up(bcfg)
    job = None
    try:
        log = open_configured_event_log(bcfg)
        per = bcfg.events.bundle_events
        nbytes = 0
        for i in range(0, n, per):
            chunk = evs[i:i + per]
            nbytes += sum(len(e.to_json()) for e in chunk)
            log.append_many(chunk)
            step("writing events", min(1.0, (i + per) / n))
        log.close()
        t_submit = time.monotonic()
        job = lake_job.run_embedded(bcfg, resume=False)
        samples: list[tuple[float, float]] = []
        t_first = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            p = read_progress(bcfg, "lake")
            done = sum(v for k, v in p.items() if k in lake.TABLES or k in ("invalid", "skipped"))
            now = time.monotonic()
            samples.append((now, done))
            if done > 0 and t_first is None:
                t_first, done_first = now, done
            step("lake job: events read", done / n)
            if done >= n:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"the lake job read {samples[-1][1]:.0f} of {n} events in 30 min")
        t_read = time.monotonic()
        while lake.read_table(bcfg, "exposures", [DATE], columns=["event_id"]).num_rows < n_exp:  # committed
            if time.monotonic() - t_read > 300:
                raise TimeoutError("the lake job's files were not committed within 300 s")
            time.sleep(0.5)
        t_done = time.monotonic()
        job.cancel().result()
        job = None
        files = sum(len(lake.files(bcfg, t)) for t in lake.TABLES)
        lake_bytes = sum(f.stat().st_size for t in lake.TABLES for f in lake.files(bcfg, t))
        step("training set (Beam)", 0.0)
        meta = training_set.run(bcfg, DATE, 1, workers=workers)
        return {
            "pages": pages, "events": n, "exposures": n_exp, "event_json_mb": round(nbytes / 2**20, 1),
            "workload": f"served pages: 1 features_served (20 x {len(HEAVY_FEATURES)} float32) + 20 exposures + engagements per page, and posts",
            # None when the job's first progress report already held every event (a workload too small to time)
            "lake_job": {"events_per_s": round((n - done_first) / (t_read - t_first), 1) if done_first < n else None,
                         "mb_per_s": round(nbytes * (n - done_first) / n / 2**20 / (t_read - t_first), 2) if done_first < n else None,
                         "seconds_read": round(t_read - t_first, 1), "seconds_to_committed": round(t_done - t_first, 1),
                         "startup_s": round(t_first - t_submit, 1), "files": files, "parquet_mb": round(lake_bytes / 2**20, 1),
                         "checkpoint_interval_ms": bcfg.flink.checkpoint_interval_ms, "parallelism": bcfg.flink.parallelism},
            "training_set": {"seconds": meta["seconds"], "exposures_per_s": round(n_exp / meta["seconds"], 1),
                             "rows": meta["splits"]["train"]["rows"] + meta["splits"]["validation"]["rows"],
                             "counts": meta["counts"], "runner": "DirectRunner", "workers": workers},
            **event_log_info(bcfg, log),
        }
    finally:
        if job is not None:
            job.cancel().result()
        stack.down(bcfg)
