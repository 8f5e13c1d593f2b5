"""Running the batch pipelines (Apache Beam): the runner and its options, and reading lake tables.

Locally the DirectRunner, in-process by default (its multi-processing mode lost elements at scale here:
jobs.training_set.check_complete); ``--runner FlinkRunner``
(or DataflowRunner) takes the same pipeline elsewhere — the FlinkRunner needs a Beam Flink job server
for this Beam version and a Flink it supports (see README "Batch tier").
"""

from __future__ import annotations

from typing import Any

from core.config import Config


def pipeline_options(runner: str = "DirectRunner", workers: int = 1, extra: list[str] | None = None) -> Any:
    """Beam options for ``runner``; Beam's own INFO lines (every worker message of the DirectRunner) are
    kept out of the output: warnings and errors still show."""
    import logging

    from apache_beam.options.pipeline_options import PipelineOptions

    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    import sys

    args = [f"--runner={runner}"]
    if runner == "DirectRunner":
        # in a process that ran a PyFlink job, PyFlink's Beam operations are registered for URNs an
        # in-process Beam worker then decodes wrongly (DecodeError): the workers get their own processes
        in_memory = workers <= 1 and "pyflink.fn_execution.beam.beam_operations" not in sys.modules
        args += ["--direct_running_mode=in_memory" if in_memory else "--direct_running_mode=multi_processing",
                 f"--direct_num_workers={max(1, workers)}"]
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
