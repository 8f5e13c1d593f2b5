"""The served-data lake: what serving logged, as Parquet tables partitioned by event date and hour.

Written by the lake job (``jobs/lake.py``, PyFlink) from the event log, read by the batch pipelines and
training. Layout: ``<lake.uri>/<table>/dt=YYYY-MM-DD/hr=HH/part-*`` (UTC event time); :func:`compact` merges
a partition's files into one ``part-compacted-*.parquet``, the form Feast's file offline store reads
(:func:`features.feast_repo.definitions` declares a ``lake_<table>`` source per table). Files
appear complete (Flink commits them with its checkpoints; in-progress files start with ``.`` and are
ignored). A producer's retry can log an event twice with one ``event_id``: readers drop the repeats
(:func:`read_table` does). Each table's columns are declared once here, with their Flink SQL types;
every table also has ``event_time`` (TIMESTAMP, for Feast's offline store) and the partition columns.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from core.config import Config

PARTITIONS = ("dt", "hr")


@dataclass(frozen=True)
class Column:
    name: str
    sql: str  # Flink SQL type
    doc: str


@dataclass(frozen=True)
class Table:
    name: str
    event_types: tuple[str, ...]  # the event types archived into it
    columns: tuple[Column, ...]
    doc: str

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _c(name: str, sql: str, doc: str) -> Column:
    return Column(name, sql, doc)


_ID = (_c("event_id", "STRING", "unique per event; repeats are producer retries"),
       _c("ts", "BIGINT", "event time, epoch ms"))

TABLES: dict[str, Table] = {t.name: t for t in (
    Table("exposures", ("exposure",), _ID + (
        _c("request_id", "STRING", "the GetFeed request that served it"),
        _c("user_id", "BIGINT", ""), _c("post_id", "BIGINT", ""), _c("author_id", "BIGINT", "null if unknown"),
        _c("position", "INT", "1-based position on the feed (across pages)"),
        _c("feed_type", "STRING", "home | explore | following"),
        _c("source", "STRING", "in_network | out_of_network | ad | trending"),
        _c("model_version", "STRING", "heavy ranker version that scored it"),
        _c("experiments", "STRING", "JSON object experiment -> variant"),
        _c("snapshot_id", "STRING", "the features_served row with its feature vector; null if served without"),
    ), "every item served, at its position"),
    Table("engagements", ("engagement",), _ID + (
        _c("user_id", "BIGINT", ""), _c("post_id", "BIGINT", ""),
        _c("action", "STRING", "view | click | like | comment | share | dwell | hide | not_interested | see_less"),
        _c("dwell_ms", "BIGINT", "dwell only"), _c("author_id", "BIGINT", ""), _c("position", "INT", "as the client saw it"),
        _c("request_id", "STRING", ""),
    ), "what users did with posts"),
    Table("features_served", ("features_served",), _ID + (
        _c("request_id", "STRING", ""), _c("snapshot_id", "STRING", "key of the exposures' snapshot_id"),
        _c("user_id", "BIGINT", ""), _c("post_ids", "ARRAY<BIGINT>", "the page's posts, row order"),
        _c("feature_schema", "STRING", "core.schema.schema_hash of the heavy features"),
        _c("n_features", "INT", "columns per row"),
        _c("rows", "BYTES", "float32 little-endian, row-major len(post_ids) x n_features: the exact served rows"),
    ), "the feature rows the heavy ranker scored, one row per page"),
    Table("shadow_scores", ("shadow_scored",), _ID + (
        _c("request_id", "STRING", ""), _c("user_id", "BIGINT", ""), _c("post_ids", "ARRAY<BIGINT>", "the page's posts"),
        _c("positions", "ARRAY<INT>", "their positions"),
        _c("current_version", "STRING", "the heavy version that served the page"),
        _c("candidate_version", "STRING", "the shadow candidate"),
        _c("current", "BYTES", "float32 len(post_ids) x 6: the served model's P(head)"),
        _c("candidate", "BYTES", "float32 len(post_ids) x 6: the candidate's P(head)"),
    ), "served pages scored by a shadow candidate beside the serving model"),
    Table("posts", ("post_published",), _ID + (
        _c("post_id", "BIGINT", ""), _c("author_id", "BIGINT", ""), _c("topic", "INT", ""),
        _c("content_type", "STRING", "text | image | video"), _c("is_original", "BOOLEAN", ""),
        _c("original_post_id", "BIGINT", "reposts only"), _c("policy_flagged", "BOOLEAN", ""), _c("text", "STRING", ""),
    ), "published posts"),
    Table("follows", ("followed", "unfollowed"), _ID + (
        _c("user_id", "BIGINT", ""), _c("author_id", "BIGINT", ""), _c("followed", "BOOLEAN", "false: an unfollow"),
    ), "follow-graph changes"),
    Table("feedback", ("feedback",), _ID + (
        _c("user_id", "BIGINT", ""), _c("action", "STRING", "hide | not_interested | see_less"),
        _c("target", "STRING", "author | topic"), _c("author_id", "BIGINT", ""), _c("topic", "INT", ""),
    ), "negative feedback on authors and topics (on posts: engagements)"),
)}
TABLE_OF_TYPE = {t: tab.name for tab in TABLES.values() for t in tab.event_types}


def row_of(table: str, ev: Any) -> tuple:
    """The table row (its declared columns, in order) of a validated event."""
    if table == "exposures":
        return (ev.event_id, ev.ts, ev.request_id, ev.user_id, ev.post_id, ev.author_id, ev.position, ev.feed_type,
                ev.source, ev.model_version, json.dumps(ev.experiments, sort_keys=True), ev.snapshot_id)
    if table == "engagements":
        return (ev.event_id, ev.ts, ev.user_id, ev.post_id, ev.action, ev.dwell_ms, ev.author_id, ev.position, ev.request_id)
    if table == "features_served":
        import base64

        return (ev.event_id, ev.ts, ev.request_id, ev.snapshot_id, ev.user_id, list(ev.post_ids), ev.feature_schema,
                ev.n_features, base64.b64decode(ev.rows))
    if table == "shadow_scores":
        import base64

        return (ev.event_id, ev.ts, ev.request_id, ev.user_id, list(ev.post_ids), list(ev.positions), ev.current_version,
                ev.candidate_version, base64.b64decode(ev.current), base64.b64decode(ev.candidate))
    if table == "posts":
        return (ev.event_id, ev.ts, ev.post_id, ev.author_id, ev.topic, ev.content_type, ev.is_original,
                ev.original_post_id, ev.policy_flagged, ev.text)
    if table == "follows":
        return (ev.event_id, ev.ts, ev.user_id, ev.author_id, ev.type == "followed")
    if table == "feedback":
        return (ev.event_id, ev.ts, ev.user_id, ev.action, ev.target, ev.author_id, ev.topic)
    raise KeyError(table)


def lake_dir(cfg: Config) -> Path:
    return Path(cfg.resolve_uri(cfg.lake.uri)[len("file://"):])


def partition(ts_ms: int) -> tuple[str, str]:
    """(dt, hr) of an event time, UTC."""
    t = dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%d"), t.strftime("%H")


def days(end: str, n: int) -> list[str]:
    """The ``n`` dates ending with ``end`` (YYYY-MM-DD), oldest first."""
    d = dt.date.fromisoformat(end)
    return [(d - dt.timedelta(days=i)).isoformat() for i in range(n - 1, -1, -1)]


def files(cfg: Config, table: str, dates: Iterable[str] | None = None) -> list[Path]:
    """The committed Parquet files of ``table`` (of the given dates, else all), oldest partition first."""
    root = lake_dir(cfg) / table
    parts = [root / f"dt={d}" for d in dates] if dates is not None else sorted(root.glob("dt=*"))
    return [f for p in parts for f in sorted(p.glob("hr=*/*")) if f.is_file() and not f.name.startswith((".", "_"))]


def served_rows(cfg: Config, snapshot_id: str, ts_ms: int) -> tuple[Any, Any, str] | None:
    """(post ids, float32 rows, feature schema hash) of the ``features_served`` row with ``snapshot_id``,
    looked up in the hour partition of its event time ``ts_ms`` only (DebugRanking of a served page);
    None when the lake has not archived it (yet)."""
    import numpy as np
    import pyarrow.compute as pc

    day, hour = partition(ts_ms)
    fs = [f for f in files(cfg, "features_served", [day]) if f.parent.name == f"hr={hour}"]
    for f in fs:
        t = _read_file(f, ["snapshot_id", "post_ids", "feature_schema", "n_features", "rows"])
        t = t.filter(pc.equal(t.column("snapshot_id"), snapshot_id))
        if t.num_rows:
            ids = np.asarray(t.column("post_ids")[0].as_py(), dtype=np.int64)
            n = int(t.column("n_features")[0].as_py())
            rows = np.frombuffer(t.column("rows")[0].as_py(), dtype="<f4").reshape(ids.size, n).astype(np.float32)
            return ids, rows, str(t.column("feature_schema")[0].as_py())
    return None


def read_table(cfg: Config, table: str, dates: Iterable[str] | None = None, columns: list[str] | None = None,
               where: Callable[[Any], Any] | None = None, unique: bool = True) -> Any:
    """One table of the lake as a pyarrow Table, repeats of an event_id dropped (the first kept; ``unique``
    False keeps them), with the partition columns; an empty table with the declared schema when nothing is
    committed."""
    import pyarrow as pa

    fs = files(cfg, table, dates)
    if not fs:
        return empty(table, columns)
    parts = []
    for f in fs:
        t = _read_file(f, None if columns is None else sorted(set(columns) | {"event_id"}))
        for k in PARTITIONS:  # from the path: dt=…/hr=…/part-…
            v = next(p.name.split("=", 1)[1] for p in f.parents if p.name.startswith(f"{k}="))
            t = t.append_column(k, pa.array([v] * t.num_rows, type=pa.string()))
        parts.append(t)
    t = pa.concat_tables(parts, promote_options="default")
    if where is not None:
        t = t.filter(where(t))
    return dedupe(t) if unique else t


def _read_file(f: Path, columns: list[str] | None = None) -> Any:
    """One committed file, ``event_time`` as naive UTC milliseconds whoever wrote it (Flink writes INT96,
    read as ns; write_rows milliseconds; :func:`compact` milliseconds with the UTC zone)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(f, columns=columns)
    if "event_time" in t.column_names:
        i = t.column_names.index("event_time")
        t = t.set_column(i, "event_time", t.column(i).cast(pa.timestamp("ms")))
    return t


COMPACTED = "part-compacted-"


def compact(cfg: Config, tables: Iterable[str] | None = None, dates: Iterable[str] | None = None,
            min_age_s: float | None = None) -> dict[str, Any]:
    """Merge each hour partition's committed files into one ``part-compacted-*.parquet`` file, repeats of an
    event_id dropped, ``event_time`` as a UTC timestamp. Why: Flink's SQL filesystem sink names its part files
    without an extension (FLINK-33987), which Feast's file offline store (dask) does not read, and it writes
    one small file per checkpoint and partition. Only files older than ``min_age_s`` (default
    ``lake.compact_min_age_s``, many checkpoint intervals: a restarted job never re-commits them) are merged;
    a partition already one compacted file is left alone. The new file appears (atomic rename) before the old
    ones are removed: a crash in between leaves repeats, which readers drop and the next run merges."""
    import time
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    age = cfg.lake.compact_min_age_s if min_age_s is None else min_age_s
    cutoff = time.time() - age
    out: dict[str, Any] = {"partitions": 0, "files_merged": 0, "rows": 0, "repeats_dropped": 0, "skipped_young": 0}
    for table in tables or TABLES:
        by_part: dict[Path, list[Path]] = {}
        for f in files(cfg, table, dates):
            by_part.setdefault(f.parent, []).append(f)
        for part, fs in by_part.items():
            old = [f for f in fs if f.stat().st_mtime <= cutoff]
            out["skipped_young"] += len(fs) - len(old)
            if not old or (len(old) == 1 and old[0].name.startswith(COMPACTED)):
                continue
            t = pa.concat_tables([_read_file(f) for f in old], promote_options="default")
            kept = dedupe(t)
            schema = arrow_schema(table).set(len(TABLES[table].columns),
                                             pa.field("event_time", pa.timestamp("ms", tz="UTC")))
            kept = kept.select(schema.names).cast(schema)
            name = f"{COMPACTED}{uuid.uuid4().hex[:12]}.parquet"
            tmp = part / f".{name}.inprogress"
            pq.write_table(kept, tmp, compression="snappy")
            tmp.rename(part / name)
            for f in old:
                f.unlink()
            out["partitions"] += 1
            out["files_merged"] += len(old)
            out["rows"] += kept.num_rows
            out["repeats_dropped"] += t.num_rows - kept.num_rows
    return out


def dedupe(t: Any) -> Any:
    """Rows of the first occurrence of each event_id."""
    import numpy as np
    import pyarrow as pa

    ids = t.column("event_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    return t.take(pa.array(np.sort(first))) if first.size < len(ids) else t


def arrow_schema(table: str, columns: list[str] | None = None) -> Any:
    """The table's columns (as the lake job writes them) as a pyarrow schema, ``event_time`` included."""
    import pyarrow as pa

    types = {"STRING": pa.string(), "BIGINT": pa.int64(), "INT": pa.int32(), "BOOLEAN": pa.bool_(),
             "BYTES": pa.binary(), "ARRAY<BIGINT>": pa.list_(pa.int64()), "ARRAY<INT>": pa.list_(pa.int32())}
    cols = [(c.name, types[c.sql]) for c in TABLES[table].columns] + [("event_time", pa.timestamp("ms"))]
    return pa.schema([c for c in cols if columns is None or c[0] in columns or c[0] == "event_id"])


def empty(table: str, columns: list[str] | None = None) -> Any:
    return arrow_schema(table, columns).empty_table()


def write_rows(cfg: Config, table: str, rows: list[tuple], writer: str = "import") -> list[Path]:
    """Append rows (:func:`row_of` tuples) to the lake as the lake job would: one new Parquet file per
    (dt, hr) partition. For seeding the lake from another source (the simulator's history, an import);
    the streaming path is the lake job."""
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    names = TABLES[table].names
    schema = arrow_schema(table)
    by: dict[tuple[str, str], list[tuple]] = {}
    for r in rows:
        by.setdefault(partition(r[1]), []).append(r)
    out = []
    for (d, h), rs in sorted(by.items()):
        cols = {n: [r[i] for r in rs] for i, n in enumerate(names)}
        cols["event_time"] = [r[1] for r in rs]
        part = lake_dir(cfg) / table / f"dt={d}" / f"hr={h}"
        part.mkdir(parents=True, exist_ok=True)
        f = part / f"part-{writer}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = part / f".{f.name}.inprogress"  # readers skip dot files: a file appears complete
        pq.write_table(pa.table(cols, schema=schema), tmp, compression="snappy")
        tmp.rename(f)
        out.append(f)
    return out


def describe() -> str:
    """The lake's schema as Markdown (README "The lake")."""
    out = []
    for t in TABLES.values():
        out.append(f"**{t.name}** ({', '.join(t.event_types)}): {t.doc}\n")
        out.append("| column | type | |\n|---|---|---|")
        out += [f"| `{c.name}` | {c.sql} | {c.doc} |" for c in t.columns]
        out.append("| `event_time` | TIMESTAMP(3) | `ts` as a timestamp (UTC) |\n| `dt`, `hr` | partition | UTC date and hour of `ts` |\n")
    return "\n".join(out)


def training_set_dir(cfg: Config, date: str, window_days: int) -> Path:
    """Where ``feedrank batch run training-set --date D --window Nd`` writes (jobs/training_set.py)."""
    return lake_dir(cfg) / "training_sets" / f"{date}-{window_days}d"


def read_training_set(path: Path, split: str) -> dict[str, Any]:
    """One split (train | validation) of a training set as arrays: ``x`` (the served rows), ``y`` (one column
    per head), ``position``, ``weight``, ``t``, ``users``, ``posts``, and the ``feature_schema`` hashes found."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.schema import HEAD_NAMES

    fs = sorted((path / split).glob("*.parquet"))
    if not fs:
        raise FileNotFoundError(f"no {split} split in {path}: run `feedrank batch run training-set` first")
    t = pa.concat_tables([pq.read_table(f) for f in fs])
    n = t.num_rows
    flat = t.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return {"x": flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32),
            "y": np.stack([t.column(h).to_numpy().astype(np.float32) for h in HEAD_NAMES], axis=1),
            "position": t.column("position").to_numpy().astype(np.int64), "weight": t.column("weight").to_numpy(),
            "t": t.column("ts").to_numpy(), "users": t.column("user_id").to_numpy(), "posts": t.column("post_id").to_numpy(),
            "feature_schema": sorted(set(t.column("feature_schema").to_pylist()))}


def schema_hash() -> str:
    """Hash of every table's columns and types: a model trained from the lake records it."""
    import hashlib

    text = "|".join(f"{t.name}:" + ",".join(f"{c.name}:{c.sql}" for c in t.columns) for t in TABLES.values())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def attribute(exposures: list[dict], engagements: list[dict], window_ms: int) -> list[list[tuple[str, int, int]]]:
    """For exposures of one (user, post), sorted by time, the (action, ts, dwell_ms) engagements that belong
    to each: an engagement belongs to the exposure of its request when it names one (and came after it),
    else to the latest exposure before it, and only within ``window_ms`` after that exposure. The training
    sets and the shadow evaluation attribute with this one rule."""
    import bisect

    starts = [r["ts"] for r in exposures]
    by_request = {r["request_id"]: i for i, r in enumerate(exposures)}
    got: list[list[tuple[str, int, int]]] = [[] for _ in exposures]
    for e in engagements:
        i = by_request.get(e.get("request_id") or "")
        if i is None or e["ts"] < exposures[i]["ts"]:
            i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] - exposures[i]["ts"] <= window_ms:
            got[i].append((e["action"], e["ts"], e.get("dwell_ms") or 0))
    return got
