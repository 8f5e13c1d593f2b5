"""What every command module shares: the Typer apps, the console, configuration, progress, bench output."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from core.config import ConfigError, get_config

app = typer.Typer(help="feedrank: feed ranking with two-tower retrieval, a 4-stage funnel and streaming features.",
                  no_args_is_help=True)  # --install-completion: bash, zsh, fish, PowerShell
flink_app = typer.Typer(help="The standalone Flink cluster (jobmanager + taskmanager) from pyflink/bin.", no_args_is_help=True)
sim_app = typer.Typer(help="The simulated social world and its clients.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate feedrank.toml + FEEDRANK_* overrides.", no_args_is_help=True)
jobs_app = typer.Typer(help="PyFlink jobs, run embedded on a local MiniCluster.", no_args_is_help=True)
events_app = typer.Typer(help="The event log.", no_args_is_help=True)
feast_app = typer.Typer(help="The Feast repository in feast_repo/ (then use the feast CLI there).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: measured numbers as JSON + markdown in bench/results/. "
                             "Without a sub-command: all of them and a summary.", invoke_without_command=True)
models_app = typer.Typer(help="The model store: versions, promotion, rollback, retention.", no_args_is_help=True)
app.add_typer(flink_app, name="flink")
app.add_typer(sim_app, name="sim")
app.add_typer(config_app, name="config")
app.add_typer(jobs_app, name="jobs")
app.add_typer(events_app, name="events")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(feast_app, name="feast")
batch_app = typer.Typer(help="Batch pipelines (Apache Beam) over the served-data lake.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
experiments_app = typer.Typer(help="A/B experiments (experiments.toml): read-outs from the served-data lake.",
                              no_args_is_help=True)
app.add_typer(experiments_app, name="experiments")
# soft_wrap: an error is one line however narrow the terminal (or its absence: 80 columns) is
console = Console(stderr=True, soft_wrap=True)


def load_cfg():
    try:
        return get_config()
    except ConfigError as e:
        console.print(f"[red]config error[/red]: {e}")
        raise typer.Exit(2)


def fail(msg: str, code: int = 1) -> None:
    console.print(f"[red]error[/red]: {msg}")
    raise typer.Exit(code)


class LineProgress:
    """Progress without a terminal (CI, a pipe, a log file), where rich would print nothing until the end:
    a line on stderr when a task starts or is renamed, at every 10%, and at 100%, with the elapsed time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tasks: dict[int, list[Any]] = {}   # id -> [description, total, last tenth printed]

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def _line(self, desc: str, frac: float) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {desc}: {frac:4.0%}", file=sys.stderr, flush=True)

    def add_task(self, description: str, total: float = 1.0, **_: Any) -> int:
        tid = len(self.tasks)
        self.tasks[tid] = [description, total or 1.0, 0]
        self._line(description, 0.0)
        return tid

    def update(self, task_id: int, completed: float | None = None, description: str | None = None, **_: Any) -> None:
        t = self.tasks[task_id]
        renamed = description is not None and description != t[0]
        if renamed:
            t[0] = description
        frac = min(max((completed or 0.0) / t[1], 0.0), 1.0) if completed is not None else None
        tenth = int(frac * 10) if frac is not None else t[2]
        if renamed or tenth > t[2]:
            t[2] = max(t[2], tenth)
            self._line(t[0], frac if frac is not None else t[2] / 10)


def progress_bars() -> Any:
    if not console.is_terminal:
        return LineProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console)


def resolve_world(cfg, data: Optional[Path]) -> Path:
    d = data or cfg.data_dir / "sim" / f"{cfg.sim.scale}-{cfg.sim.seed}"
    if not (d / "ground_truth.npz").exists():
        fail(f"no simulated world at {d}: run `feedrank sim generate` (or pass --data)")
    return d


class StageProgress:
    """One rich progress bar per named stage, fed by (stage, fraction) callbacks."""

    def __init__(self, prog: Any):
        self.prog, self.tasks = prog, {}

    def __call__(self, stage: str, frac: float) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.prog.add_task(stage, total=1.0)
        self.prog.update(self.tasks[stage], completed=frac)


def write_bench(name: str, res: dict) -> None:
    """A bench's result: JSON + markdown under bench/results/, the JSON on stdout."""
    from lab.bench import write_result

    path = write_result(name, res)
    print(json.dumps(res))
    console.print(f"written to {path}")


def rps_levels(rps: str) -> tuple[float, ...]:
    """``--rps 20,50,100`` -> (20.0, 50.0, 100.0), or a clear error."""
    try:
        levels = tuple(float(x) for x in rps.split(",") if x.strip())
    except ValueError:
        fail(f"--rps must be numbers separated by commas, got {rps!r}")
    if not levels or min(levels) <= 0:
        fail(f"--rps needs at least one positive load, got {rps!r}")
    return levels
