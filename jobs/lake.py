"""The lake job (PyFlink, thread mode): the event log -> Parquet tables partitioned by event date and hour.

    event_lines (Kafka / file source)
      ─ RouteFunction           validate each event; one output per table (side outputs), bad events counted
      ─ from_data_stream        each output as a Table
      ─ INSERT INTO lake_<t>    Flink's filesystem sink, 'format' = 'parquet', PARTITIONED BY (dt, hr)
                                (one statement set: one job)

Exactly once across a kill and resume: the source's offsets and the sink's pending files are in the same
checkpoint, files are committed (renamed into place) only when it completes, and a resumed job continues
from the newest retained checkpoint. A producer retry (the same event_id logged twice) is kept twice: the
lake's readers drop repeats (features.lake). The tables and their columns are declared in features/lake.py.
Run embedded with ``feedrank jobs run lake`` or on the cluster with ``flink run -py jobs/lake.py``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from core.config import Config

log = logging.getLogger("feedrank.jobs.lake")
JOB = "lake"
PROGRESS_EVERY_S = 2.0


def _types() -> dict[str, Any]:
    from pyflink.common import Types

    return {"STRING": Types.STRING(), "BIGINT": Types.LONG(), "INT": Types.INT(), "BOOLEAN": Types.BOOLEAN(),
            "BYTES": Types.PRIMITIVE_ARRAY(Types.BYTE()), "ARRAY<BIGINT>": Types.BASIC_ARRAY(Types.LONG()),
            "ARRAY<INT>": Types.BASIC_ARRAY(Types.INT())}


def row_type(table: str) -> Any:
    from pyflink.common import Types

    from features.lake import TABLES

    t, types = TABLES[table], _types()
    return Types.ROW_NAMED(t.names, [types[c.sql] for c in t.columns])


def _route_function(cfg: Config, tags: dict[str, Any]) -> Any:
    from pyflink.common import Row
    from pyflink.datastream import KeyedProcessFunction

    main = "exposures"

    class RouteFunction(KeyedProcessFunction):
        """One validated event -> the row of its table: exposures on the main output, the others on
        their side outputs. Invalid events (the feature job logs their reasons) and types the lake
        does not keep are counted in the job's progress, written by a processing-time timer (keyed:
        only keyed functions have timers)."""

        def open(self, ctx: Any) -> None:
            from features.connection import redis_client
            from features.progress import PROGRESS_KEY
            from jobs import startup_stacks

            startup_stacks.begin(cfg, "lake router")
            self.redis = redis_client(cfg)
            self.key = PROGRESS_KEY.format(job=JOB)
            self.counts: dict[str, int] = {}
            self.redis.hincrby(self.key, "opened", 1)
            startup_stacks.end("lake router")

        def _count(self, what: str, ctx: Any) -> None:
            if not self.counts:  # the first count since the last write: write within PROGRESS_EVERY_S
                ts = ctx.timer_service()
                ts.register_processing_time_timer(ts.current_processing_time() + int(PROGRESS_EVERY_S * 1000))
            self.counts[what] = self.counts.get(what, 0) + 1

        def flush(self) -> None:
            if self.counts:
                with self.redis.pipeline(transaction=False) as p:
                    for k, v in self.counts.items():
                        p.hincrby(self.key, k, v)
                    p.execute()
                self.counts.clear()

        def on_timer(self, timestamp: int, ctx: Any):
            self.flush()
            return iter(())

        def process_element(self, line: str, ctx: Any):
            from core.events import InvalidEvent, parse_event
            from features.lake import TABLE_OF_TYPE, row_of

            try:
                ev = parse_event(line)
            except InvalidEvent:
                self._count("invalid", ctx)
                return
            table = TABLE_OF_TYPE.get(ev.type)  # type: ignore[attr-defined]
            if table is None:
                self._count("skipped", ctx)
                return
            self._count(table, ctx)
            row = Row(*row_of(table, ev))
            if table == main:
                yield row
            else:
                yield tags[table], row

        def close(self) -> None:
            self.flush()

    return RouteFunction


def sink_ddl(cfg: Config, table: str) -> str:
    from features.lake import TABLES, lake_dir

    cols = ",\n  ".join(f"`{c.name}` {c.sql}" for c in TABLES[table].columns)
    return f"""CREATE TABLE IF NOT EXISTS lake_{table} (
  {cols},
  `event_time` TIMESTAMP(3),
  `dt` STRING,
  `hr` STRING
) PARTITIONED BY (dt, hr) WITH (
  'connector' = 'filesystem',
  'path' = '{(lake_dir(cfg) / table).as_uri()}',
  'format' = 'parquet',
  'parquet.compression' = 'SNAPPY',
  'parquet.utc-timezone' = 'true',
  'sink.partition-commit.trigger' = 'process-time',
  'sink.partition-commit.delay' = '{cfg.lake.partition_commit_delay_s} s',
  'sink.partition-commit.policy.kind' = 'success-file'
)"""


def insert_sql(table: str) -> str:
    from features.lake import TABLES

    cols = ", ".join(f"`{c}`" for c in TABLES[table].names)
    t = "TO_TIMESTAMP_LTZ(`ts`, 3)"
    return (f"INSERT INTO lake_{table} SELECT {cols}, CAST({t} AS TIMESTAMP(3)), "
            f"DATE_FORMAT({t}, 'yyyy-MM-dd'), DATE_FORMAT({t}, 'HH') FROM v_{table}")


def build(env: Any, cfg: Config) -> Any:
    """The statement set of the whole job (execute it to submit)."""
    from pyflink.common import Types
    from pyflink.datastream import OutputTag
    from pyflink.table import StreamTableEnvironment

    from core import jvm
    from features.lake import TABLES
    from jobs.sources import event_lines

    env.add_jars(*(jvm.jar(cfg, j).as_uri() for j in ("flink-sql-parquet", "hadoop-client-api", "hadoop-client-runtime")))
    tags = {t: OutputTag(f"lake-{t}", row_type(t)) for t in TABLES if t != "exposures"}
    # keyed (for the progress timer) by a cheap deterministic key: the line's length
    routed = (event_lines(env, cfg, "events", JOB).key_by(lambda line: len(line) % 16, key_type=Types.INT())
              .process(_route_function(cfg, tags)(), output_type=row_type("exposures")).name("route").uid("route"))
    streams = {"exposures": routed, **{t: routed.get_side_output(tag) for t, tag in tags.items()}}
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    stmts = t_env.create_statement_set()
    for table, stream in streams.items():
        t_env.create_temporary_view(f"v_{table}", t_env.from_data_stream(stream))
        t_env.execute_sql(sink_ddl(cfg, table))
        stmts.add_insert_sql(insert_sql(table))
    return stmts


def run_embedded(cfg: Config, resume: bool = True) -> Any:
    """Submit to a local MiniCluster; returns the JobClient (cancel it to stop). ``resume``: continue
    from the newest retained checkpoint of this job on this event log, if there is one."""
    from jobs.feature_job import restart_configuration
    from jobs.flinkenv import job_configuration, stream_env

    ckpt, restored = job_configuration(cfg, JOB, resume)
    if restored is not None:
        log.info("resuming from checkpoint %s", restored)
    env = stream_env(cfg, {**restart_configuration(cfg), **ckpt})
    return build(env, cfg).execute().get_job_client()


def main(argv: list[str]) -> None:
    """Entry point for `flink run -py jobs/lake.py [-- --feedrank-config FILE]`."""
    from jobs.feature_job import restart_configuration
    from jobs.flinkenv import job_config, job_configuration, stream_env

    logging.basicConfig(level=logging.INFO)
    cfg = job_config(argv)
    env = stream_env(cfg, {**restart_configuration(cfg), **job_configuration(cfg, JOB, resume=False, prune=False)[0]})
    build(env, cfg).execute().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
