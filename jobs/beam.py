"""Running the batch pipelines (Apache Beam): the runner and its options, and reading lake tables.

Locally the DirectRunner in multi-processing mode (``--workers`` processes); ``--runner FlinkRunner``
(or DataflowRunner) takes the same pipeline elsewhere — the FlinkRunner needs a Beam Flink job server
for this Beam version and a Flink it supports (see README "Batch tier").
"""

from __future__ import annotations

from typing import Any

from core.config import Config


def pipeline_options(runner: str = "DirectRunner", workers: int = 2, extra: list[str] | None = None) -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions

    args = [f"--runner={runner}"]
    if runner == "DirectRunner":
        args += ["--direct_running_mode=multi_processing" if workers > 1 else "--direct_running_mode=in_memory",
                 f"--direct_num_workers={workers}"]
    return PipelineOptions(args + list(extra or []))


def read_lake(p: Any, cfg: Config, table: str, dates: list[str], label: str | None = None) -> Any:
    """A PCollection of the table's rows (dicts) for ``dates``: the committed Parquet files, read by
    Beam's parquetio (an empty PCollection when there are none)."""
    import apache_beam as beam
    from apache_beam.io.parquetio import ReadAllFromParquet

    from features.lake import files

    paths = [str(f) for f in files(cfg, table, dates)]
    name = label or table
    return p | f"{name} files" >> beam.Create(paths) | f"read {name}" >> ReadAllFromParquet()


class FirstPerKey:
    """CombinePerKey function: one row per key (the earliest by ts, then event_id): drops repeats
    of an event_id (producer retries) deterministically."""

    def __call__(self, rows: Any) -> Any:
        return min(rows, key=lambda r: (r["ts"], r["event_id"]))


def dedupe(pcoll: Any, label: str) -> Any:
    import apache_beam as beam

    return (pcoll | f"{label} by id" >> beam.Map(lambda r: (r["event_id"], r))
            | f"{label} first" >> beam.CombinePerKey(FirstPerKey()) | f"{label} rows" >> beam.Values())
