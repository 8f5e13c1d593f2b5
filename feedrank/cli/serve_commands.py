"""Serving and the streaming jobs: `serve`, `token`, `jobs run`."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from feedrank.cli.common import app, jobs_app, console, load_cfg, fail


@app.command()
def serve(
    world_dir: Optional[Path] = typer.Option(None, "--world", help="Bootstrap posts/follows from this world export; "
                                             "the server clock then continues from the world's end"),
    port: int = typer.Option(0, help="gRPC port (default serving.port)"),
    workers: int = typer.Option(0, help="Server processes sharing the port (default serving.workers)"),
    replicas: int = typer.Option(0, help="Run this many replicas (each with --workers processes) on the next "
                                 "ports, behind nginx balancing gRPC calls on --port (state shared in Redis)"),
    metrics_port: int = typer.Option(-1, hidden=True, help="Prometheus port of worker 0 (default serving.metrics_port)"),
    http_port: int = typer.Option(-1, hidden=True, help="HTTP API port (default serving.http_port; 0 = none)"),
    describe: bool = typer.Option(False, "--describe", help="Print the pipelines component by component and exit"),
    log_format: str = typer.Option("json", help="json (one object per line, with request ids) or text"),
    worker_index: int = typer.Option(-1, hidden=True),
    clock_origin: str = typer.Option("", hidden=True, help="wall0_ms,sim0_ms,world_end_ms from the supervisor"),
) -> None:
    """Start the gRPC FeedService (health checking and reflection on; Prometheus on serving.metrics_port + i).

    With several workers (serving.workers) this process supervises that many server
    processes bound to the same port (SO_REUSEPORT); the kernel spreads connections. With
    --replicas N it supervises N replicas on ports PORT+1..PORT+N and nginx on PORT, which sends
    each gRPC call to the next replica (README: several replicas)."""
    import signal

    from core.services import ServiceError
    if describe:
        from serving.feed import describe_declared

        print("\n".join(describe_declared()))
        return
    from serving.logs import configure

    configure(log_format)
    cfg = load_cfg()
    from serving.edge import Authenticator, InsecureConfig

    try:  # keys checked before anything starts (a supervisor would restart refused workers forever)
        Authenticator.from_config(cfg)
    except InsecureConfig as e:
        fail(str(e), 2)
    from runtime.serve import publish_clock, run_replicas, run_worker, supervise_workers

    n = workers or cfg.serving.workers
    port = port or cfg.serving.port
    mport = cfg.serving.metrics_port if metrics_port < 0 else metrics_port
    hport = cfg.serving.http_port if http_port < 0 else http_port
    origin: dict[str, int] = {}
    if clock_origin:  # a worker: the supervisor's clock, so every worker (and restarted ones) agree
        origin = dict(zip(("wall0_ms", "sim0_ms", "world_end_ms"), (int(v) for v in clock_origin.split(","))))
    elif world_dir is not None:  # the supervisor (or the only process) fixes the clock
        try:
            origin = publish_clock(cfg, world_dir)
        except ServiceError as e:
            fail(str(e))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    clock_args = ["--world", str(world_dir), "--clock-origin",
                  ",".join(str(origin[k]) for k in ("wall0_ms", "sim0_ms", "world_end_ms"))] if world_dir else []
    if replicas > 0 and worker_index < 0:
        argv = [sys.executable, "-m", "feedrank.cli", "serve", "--log-format", log_format, *clock_args]
        console.print(f"FeedService: {replicas} replicas of {n} workers on {cfg.serving.host}:{port + 1}.."
                      f"{port + replicas}, nginx on {cfg.serving.host}:{port} once they are ready; Ctrl-C stops")
        try:
            run_replicas(cfg, argv, port, replicas, n, stop, say=console.print, http_port=hport)
        except ServiceError as e:
            fail(str(e))
        return
    if n > 1 and worker_index < 0:
        # the same interpreter and entry point however this one was started (console script or -m)
        argv = [sys.executable, "-m", "feedrank.cli", "serve", "--port", str(port), "--log-format", log_format,
                "--workers", str(n), "--metrics-port", str(mport), "--http-port", str(hport), *clock_args]
        console.print(f"FeedService: {n} workers on {cfg.serving.host}:{port} (metrics :{mport}..{mport + n - 1}"
                      + (f", HTTP API :{hport}" if hport else "") + "); Ctrl-C stops")
        supervise_workers(argv, n, stop, say=console.print)
        return
    try:
        run_worker(cfg, world_dir, origin, port, max(worker_index, 0), reuse_port=n > 1, stop=stop, say=console.print,
                   metrics_port=mport, http_port=hport)
    except ServiceError as e:
        fail(str(e))


@app.command()
def token(user_id: int, admin: bool = typer.Option(False), ttl_s: float = typer.Option(3600.0)) -> None:
    """Print a bearer token for USER_ID signed with serving.jwt_secret (for grpcurl and scripts); it carries
    serving.jwt_issuer / jwt_audience when set and lives at most serving.jwt_max_lifetime_s."""
    from serving.edge import InsecureConfig, config_token

    try:
        print(config_token(load_cfg(), user_id, admin, ttl_s))
    except (InsecureConfig, ValueError) as e:
        fail(str(e), 2)


@jobs_app.command("run")
def jobs_run(
    job: str = typer.Argument(..., help="audit | features | learner | lake"),
    expect: int = typer.Option(None, help="audit: stop after this many events (default: when idle); "
                                          "exit 1 if fewer arrive"),
    idle: float = typer.Option(10.0, help="audit: stop after this many seconds without new events, counted "
                                          "from the job's first output (until then: flink.startup_timeout_s)"),
    seconds: float = typer.Option(0.0, help="features/learner/lake: stop after this long (0 = until Ctrl-C)"),
    fresh: bool = typer.Option(False, "--fresh", help="features/learner/lake: ignore retained checkpoints and start from "
                                                      "the beginning of the event log"),
) -> None:
    """Run a PyFlink job embedded (local MiniCluster, thread mode).

    lake archives the event log as Parquet under lake.uri (features/lake.py: the tables).
    audit prints its counts as JSON; it exits 1 (one line, no JSON) when it read no event within
    flink.startup_timeout_s ("no events in <uri> within N s", or the job did not start) and when
    --expect events did not all arrive: 0 events is never a result. features and learner run until
    stopped and show their progress (also in Redis: feedrank:jobs:<job>:progress). They resume from
    their newest retained checkpoint on this event log (kept when the job is stopped or its JVM dies)."""
    from core.services import ServiceError

    cfg = load_cfg()
    if job in ("features", "learner", "lake"):
        from runtime.jobrun import JobRunError, run_streaming_job

        try:
            print(json.dumps(run_streaming_job(cfg, job, seconds, resume=not fresh, say=console.print)))
        except JobRunError as e:
            fail(str(e))
        return
    if job != "audit":
        fail(f"unknown job {job!r} (available: audit, features, learner, lake)")
    from jobs.audit import run_embedded

    try:
        result = run_embedded(cfg, expect=expect, idle_s=idle, on_progress=lambda n: console.print(f"  {n} events", end="\r"))
    except ServiceError as e:
        fail(str(e))
    if expect is not None and result["events"] < expect:
        why = {"idle": f"no new event in {cfg.events.uri} for {idle:g} s", "max_s": "it ran for its 600 s limit"}
        fail(f"audited {result['events']} of the {expect} events expected: "
              f"{why.get(result['stopped'], 'the job ended by itself')}")
    print(json.dumps(result))
