"""The lake's files: compaction into one .parquet file per hour partition (Flink's files have no extension,
FLINK-33987), and the compacted tables read back through Feast's file offline store (dask)."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from core.events import Engagement
from features import lake
from jobs.feature_job_test import T

MIN = 60_000


def _flink_style_file(cfg, rows):
    """A part file as Flink's filesystem sink writes it: no extension, event_time as INT96."""
    d, h = lake.partition(rows[0][1])
    part = lake.lake_dir(cfg) / "engagements" / f"dt={d}" / f"hr={h}"
    part.mkdir(parents=True, exist_ok=True)
    names = lake.TABLES["engagements"].names
    cols = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    cols["event_time"] = [datetime.fromtimestamp(r[1] / 1000, tz=timezone.utc).replace(tzinfo=None) for r in rows]
    schema = lake.arrow_schema("engagements").set(len(names), pa.field("event_time", pa.timestamp("ns")))
    pq.write_table(pa.table(cols, schema=schema), part / "part-7d1c-0-3", use_deprecated_int96_timestamps=True)


def test_compaction_merges_partitions_and_feast_reads_the_lake(make_cfg):
    from feast.infra.offline_stores.dask import DaskOfflineStore

    from features.feast_repo import definitions, feature_store

    cfg = make_cfg()
    rows = [lake.row_of("engagements", Engagement(event_id=f"e{i}", ts=T + i * 5 * MIN, user_id=i % 3, post_id=100 + i,
                                                  action="click")) for i in range(20)]  # two hours: 0-11, 12-19
    lake.write_rows(cfg, "engagements", rows[:5])
    lake.write_rows(cfg, "engagements", rows[3:12], writer="retry")  # e3, e4 repeated
    _flink_style_file(cfg, rows[12:])
    before = lake.read_table(cfg, "engagements")
    assert before.num_rows == 20 and len(lake.files(cfg, "engagements")) == 3

    young = lake.compact(cfg)  # default: only files older than lake.compact_min_age_s
    assert young["partitions"] == 0 and young["skipped_young"] == 3
    got = lake.compact(cfg, min_age_s=0)
    assert got == {"partitions": 2, "files_merged": 3, "rows": 20, "repeats_dropped": 2, "skipped_young": 0}
    fs = lake.files(cfg, "engagements")
    assert len(fs) == 2 and all(f.name.startswith(lake.COMPACTED) and f.suffix == ".parquet" for f in fs)
    after = lake.read_table(cfg, "engagements")
    key = lambda t: sorted(zip(t.column("event_id").to_pylist(), t.column("ts").to_pylist(),  # noqa: E731
                               t.column("event_time").to_pylist(), t.column("hr").to_pylist()))
    assert key(after) == key(before)
    assert lake.compact(cfg, min_age_s=0)["partitions"] == 0  # already one compacted file each

    # Feast: the lake_<table> sources, read by the file offline store
    defs = definitions(cfg.data_dir, lake.lake_dir(cfg))
    assert {f"lake_{t}" for t in lake.TABLES} <= set(defs)
    store = feature_store(cfg)
    job = DaskOfflineStore.pull_all_from_table_or_query(
        config=store.config, data_source=defs["lake_engagements"], join_key_columns=["user_id"],
        feature_name_columns=["event_id", "post_id", "action"], timestamp_field="event_time",
        start_date=datetime.fromtimestamp(T / 1000, tz=timezone.utc),
        end_date=datetime.fromtimestamp((T + 200 * MIN) / 1000, tz=timezone.utc))
    df = job.to_df()
    assert sorted(df["event_id"]) == sorted(f"e{i}" for i in range(20))
    assert dict(zip(df["event_id"], df["post_id"]))["e13"] == 113
    assert not os.path.exists(lake.lake_dir(cfg) / "engagements" / "dt=2026-01-05" / "hr=01" / "part-7d1c-0-3")
