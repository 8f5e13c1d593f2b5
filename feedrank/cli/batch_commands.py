"""`feedrank batch run training-set|features --date D`: the Apache Beam pipelines over the lake."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Optional

import typer

from feedrank.cli.common import batch_app, fail, load_cfg


def window_days(window: str) -> int:
    """'7d' or '7' -> 7."""
    m = re.fullmatch(r"\s*(\d+)\s*d?\s*", window)
    if not m or int(m.group(1)) < 1:
        fail(f"--window {window!r}: a number of days, e.g. 7d")
    return int(m.group(1))


def lake_date(date: Optional[str]) -> str:
    if date is None:
        return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
    try:
        return dt.date.fromisoformat(date).isoformat()
    except ValueError:
        fail(f"--date {date!r}: expected YYYY-MM-DD")
        raise


@batch_app.command("run")
def batch_run(
    pipeline: str = typer.Argument(..., help="training-set | features"),
    date: Optional[str] = typer.Option(None, help="The last day (UTC, YYYY-MM-DD) of the window; default yesterday"),
    window: str = typer.Option("1d", help="Days of exposures ending with --date (training-set)"),
    runner: str = typer.Option("DirectRunner", help="Beam runner: DirectRunner (local processes), FlinkRunner, DataflowRunner"),
    workers: int = typer.Option(1, help="DirectRunner: worker processes (1: in-process; more lost elements here, see README)"),
    option: list[str] = typer.Option([], "--option", help="Extra Beam pipeline option, e.g. --option=--flink_master=localhost:8081"),
) -> None:
    """Run a batch pipeline over the lake (lake.uri) and print what it wrote as JSON."""
    cfg = load_cfg()
    d = lake_date(date)
    if pipeline == "training-set":
        from jobs.training_set import IncompleteRun, run

        try:
            meta = run(cfg, d, window_days(window), runner=runner, workers=workers, extra_options=option)
        except IncompleteRun as e:
            fail(str(e))
        if meta["counts"]["exposures"] == 0:
            fail(f"no exposures in the lake for {', '.join(meta['dates'])} ({cfg.lake.uri}): is `feedrank jobs run lake` running?")
        print(json.dumps(meta))
    elif pipeline == "features":
        from jobs.batch_features import run as run_features

        print(json.dumps(run_features(cfg, d, runner=runner, workers=workers, extra_options=option)))
    else:
        fail(f"unknown pipeline {pipeline!r}: training-set | features")


@batch_app.command("compact")
def batch_compact(
    date: Optional[str] = typer.Option(None, help="The last day (UTC, YYYY-MM-DD) to compact; default: every day"),
    window: str = typer.Option("1d", help="With --date: days ending with it"),
    min_age_s: Optional[int] = typer.Option(None, help="Merge files older than this (default lake.compact_min_age_s)"),
) -> None:
    """Merge each hour partition of the lake into one .parquet file (what Feast's file offline store reads;
    Flink's part files have no extension). Prints what it merged as JSON."""
    from features.lake import compact, days

    cfg = load_cfg()
    dates = days(lake_date(date), window_days(window)) if date else None
    print(json.dumps(compact(cfg, dates=dates, min_age_s=min_age_s)))


@batch_app.command("daily")
def batch_daily(
    date: Optional[str] = typer.Option(None, help="The day to process (UTC, YYYY-MM-DD); default yesterday"),
    window: str = typer.Option("7d", help="Days of exposures the heavy ranker is retrained on"),
    workers: int = typer.Option(1, help="Beam DirectRunner processes (see README)"),
) -> None:
    """The daily cycle: decide the running shadow, batch features, training set, retrain the heavy ranker,
    shadow-score the candidate (runtime/daily.py). Prints its report as JSON; cron-friendly."""
    from feedrank.cli.common import console
    from models.lake_training import LakeTrainingError
    from models.shadow import ShadowError
    from jobs.training_set import IncompleteRun
    from runtime.daily import daily_cycle

    cfg = load_cfg()
    try:
        report = daily_cycle(cfg, lake_date(date), window_days(window), workers, say=console.print)
    except (LakeTrainingError, ShadowError, IncompleteRun, FileNotFoundError) as e:
        fail(str(e))
    print(json.dumps(report, default=str))
