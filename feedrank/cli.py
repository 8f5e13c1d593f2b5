"""The `feedrank` command line: one entry point for the stack, the simulator and the jobs."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
# soft_wrap: an error is one line however narrow the terminal (or its absence: 80 columns) is
console = Console(stderr=True, soft_wrap=True)


def _cfg():
    try:
        return get_config()
    except ConfigError as e:
        console.print(f"[red]config error[/red]: {e}")
        raise typer.Exit(2)


def _fail(msg: str, code: int = 1) -> None:
    console.print(f"[red]error[/red]: {msg}")
    raise typer.Exit(code)


# ----------------------------------------------------------------------------- stack


@app.command()
def up() -> None:
    """Start Redis, prepare the event log, and start a local Apache Kafka broker when the event log is kafka://."""
    from runtime import stack
    from core.services import ServiceError

    cfg = _cfg()
    try:
        for name, outcome in stack.up(cfg):
            console.print(f"[green]✓[/green] {name}: {outcome}")
    except ServiceError as e:
        _fail(str(e))


@app.command()
def down() -> None:
    """Stop everything `up` (and `flink up`) started; nothing else."""
    from runtime import stack

    for name, outcome in stack.down(_cfg()):
        console.print(f"{name}: {outcome}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Health of each service of the embedded stack. Exit code 1 if any is unhealthy."""
    from runtime import stack

    rows = stack.status(_cfg())
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        t = Table("service", "address", "pid", "healthy")
        for r in rows:
            t.add_row(r["name"], r["address"], str(r.get("pid") or "-"),
                      "[green]healthy[/green]" if r["healthy"] else "[red]down[/red]")
        Console().print(t)
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- flink


@flink_app.command("up")
def flink_up() -> None:
    """Start the standalone cluster (conf, logs, pids under var/flink)."""
    from runtime import flink
    from core.services import ServiceError

    try:
        console.print(f"[green]✓[/green] flink: {flink.cluster_up(_cfg())}")
    except ServiceError as e:
        _fail(str(e))


@flink_app.command("down")
def flink_down() -> None:
    """Stop the standalone cluster started by `feedrank flink up`."""
    from runtime import flink

    console.print(f"flink: {flink.cluster_down(_cfg())}")


@flink_app.command("status")
def flink_status() -> None:
    """Cluster overview from the REST API."""
    from runtime import flink

    cfg = _cfg()
    ov = flink.rest_overview(cfg)
    print(json.dumps({"running": ov is not None, "pids": flink.cluster_pids(cfg), "overview": ov}, indent=2))
    if ov is None:
        raise typer.Exit(1)


def _checkpointed_job(job_py: Path) -> str | None:
    """The checkpoint name (``JOB``) of one of our job scripts, None for any other script."""
    import importlib

    from core.config import PROJECT_ROOT

    if job_py.resolve().parent != PROJECT_ROOT / "jobs":
        return None
    try:
        return getattr(importlib.import_module(f"jobs.{job_py.stem}"), "JOB", None)
    except ImportError:
        return None


@flink_app.command("submit")
def flink_submit(job: Path = typer.Argument(..., help="Python job file, e.g. jobs/audit.py"),
                 args: Optional[list[str]] = typer.Argument(None),
                 fresh: bool = typer.Option(False, "--fresh", help="ignore retained checkpoints: read the log from the start")) -> None:
    """`flink run -py JOB -pyexec <venv python>` against the standalone cluster (detached); returns once
    every operator runs, restarting a job whose operators never open (see runtime.flink.submit_supervised),
    and, for a checkpointing (streaming) job, once it completed its first checkpoint: operators RUNNING
    alone said nothing about a job that never got a checkpoint through. Exit 1 if none completes within
    flink.startup_timeout_s. A job of ours with a retained checkpoint on this event log resumes from
    the newest one (`flink run -s`), as `jobs run` does, unless --fresh."""
    from jobs import flinkenv
    from runtime import flink
    from core.services import ServiceError

    cfg = _cfg()
    name = _checkpointed_job(job)
    running = flinkenv.running_jobs(cfg)
    twin = [jid for jid, n in running.items() if name and n == f"feedrank-{name}"]
    if twin:  # two copies of a job on one log would count every event twice
        _fail(f"the {name} job already runs on this cluster (job {twin[0]}): cancel it first "
              f"(flink cancel {twin[0]}, or the UI on http://localhost:{cfg.flink.rest_port})")
    restore = flinkenv.latest_checkpoint(cfg, name) if name and not fresh else None
    if name:
        flinkenv.prune_checkpoints(cfg, name, restore, set(running))
        console.print(f"{name} job: resuming from checkpoint {restore}" if restore else
                      f"{name} job: starting from the beginning of {cfg.events.uri} (no retained checkpoint"
                      f"{' used: --fresh' if fresh else ''})")
    try:
        job_id = flink.submit_supervised(cfg, job, list(args or []), say=console.print, restore=restore)
        checkpoints = flink.await_checkpoint(cfg, job_id, job.name)
    except ServiceError as e:
        _fail(f"{e}{' (a checkpoint of other code or configuration: try --fresh)' if restore else ''}")
    done = "checkpointing off" if checkpoints is None else f"{checkpoints} checkpoint{'s' * (checkpoints > 1)} completed"
    console.print(f"[green]✓[/green] {job.name}: job {job_id} running, {done}")


@flink_app.command("env")
def flink_env() -> None:
    """Print `export` lines for a plain `flink run` against this cluster: eval "$(feedrank flink env)".

    FLINK_HOME, FLINK_CONF_DIR / FLINK_LOG_DIR / FLINK_PID_DIR under var/flink (never site-packages),
    PYTHONPATH and PYFLINK_CLIENT_EXECUTABLE for the venv, PATH with pyflink's bin (the `flink`
    script) first; the same variables `flink up` and `flink submit` use (runtime.flink.cluster_variables)."""
    from runtime import flink

    cfg = _cfg()
    if not (flink.cluster_dirs(cfg)["conf"] / "config.yaml").exists():
        console.print(f"[yellow]note[/yellow]: no cluster conf in {flink.cluster_dirs(cfg)['conf']} yet: "
                      "run `feedrank flink up` first")
    sys.stdout.write(flink.shell_exports(cfg))


# ----------------------------------------------------------------------------- config


@config_app.command("check")
def config_check() -> None:
    """Validate the configuration; exit 2 naming the key and reason if invalid."""
    _cfg()
    console.print("[green]configuration is valid[/green]")


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration as JSON."""
    print(_cfg().model_dump_json(indent=2))


# ----------------------------------------------------------------------------- sim


class _LineProgress:
    """Progress without a terminal (CI, a pipe, a log file), where rich would print nothing until the end:
    a line on stderr when a task starts or is renamed, at every 10%, and at 100%, with the elapsed time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tasks: dict[int, list[Any]] = {}   # id -> [description, total, last tenth printed]

    def __enter__(self) -> "_LineProgress":
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


def _progress() -> Any:
    if not console.is_terminal:
        return _LineProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console)


@sim_app.command("generate")
def sim_generate(
    scale: str = typer.Option(None, help="small | medium | large (default: sim.scale)"),
    seed: int = typer.Option(None, help="Random seed (default: sim.seed). Same seed, same tables."),
    out: Path = typer.Option(None, help="Output directory (default: var/sim/<scale>-<seed>)"),
) -> None:
    """Generate a simulated world: users, posts, follows, impressions, engagements + ground truth."""
    from sim.generate import generate

    cfg = _cfg()
    scale = scale or cfg.sim.scale
    seed = cfg.sim.seed if seed is None else seed
    out = out or cfg.data_dir / "sim" / f"{scale}-{seed}"
    with _progress() as prog:
        task = prog.add_task(f"generating {scale} world", total=1.0)
        try:
            meta = generate(cfg, scale, seed, out, progress=lambda stage, f: prog.update(task, completed=f, description=f"{scale}: {stage}"))
        except ValueError as e:
            _fail(str(e))
    print(json.dumps({k: meta[k] for k in ("scale", "seed", "users", "posts", "follows", "impressions", "engagements", "seconds")}))
    console.print(f"written to {out}")


@sim_app.command("clients")
def sim_clients(
    world_dir: Path = typer.Option(None, "--world", help="World directory (default: var/sim/<sim.scale>-<sim.seed>)"),
    users: int = typer.Option(200, help="Simulated users"),
    duration: float = typer.Option(1800.0, help="Seconds to run (simulated seconds for --target local)"),
    target: str = typer.Option("grpc", help="grpc = the FeedService (`feedrank serve`); local = in-process V0 feed"),
    address: str = typer.Option("", help="FeedService host:port for --target grpc (default: serving.host:port)"),
    seed: int = typer.Option(0),
) -> None:
    """Run simulated users and creators against a feed API; events go to the event log.

    With --target grpc the clients run in real time against a server started with
    `feedrank serve --world` (whose clock continues from the end of the same world)."""
    from sim.clients import Population, SimClock, WallClock
    from sim.world import World

    cfg = _cfg()
    world_dir = world_dir or cfg.data_dir / "sim" / f"{cfg.sim.scale}-{cfg.sim.seed}"
    if not (world_dir / "ground_truth.npz").exists():
        _fail(f"no world at {world_dir}: run `feedrank sim generate` first")
    if target not in ("grpc", "local"):
        _fail(f"--target must be grpc or local, got {target!r}")
    world = World.load(world_dir)
    pop = Population(world, cfg.clients, users, seed=seed, page_size=cfg.funnel.page_size,
                     repost_rate=cfg.sim.repost_rate, policy_flag_rate=cfg.sim.policy_flag_rate)
    if target == "local":
        from features.eventlog import open_configured_event_log
        from sim.chronological import ChronologicalFeed

        log = open_configured_event_log(cfg)
        api: Any = ChronologicalFeed(world, log)
        clock: Any = SimClock(world.end_ms)
    else:
        import grpc

        from runtime.serve import server_offset_ms
        from serving.client import GrpcFeedApi

        address = address or f"{cfg.serving.host}:{cfg.serving.port}"
        api = GrpcFeedApi(address, cfg.serving.jwt_secret)
        try:
            grpc.channel_ready_future(api.channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            _fail(f"no FeedService at {address}: start it with `feedrank serve --world {world_dir}`")
        clock = WallClock(world.end_ms + server_offset_ms(cfg))
    with _progress() as prog:
        task = prog.add_task("simulated clients", total=duration)
        stats = pop.run(api, clock, duration, on_tick=lambda el, st: prog.update(task, completed=el / 1000.0))
    out = {"sessions": stats.sessions, "impressions": stats.impressions, "ctr": round(stats.ctr, 4),
           "actions": dict(stats.actions), "published": stats.published, "follows": stats.follows,
           "errors": stats.errors, "utility": round(stats.utility, 2), "sources": dict(stats.sources)}
    if target == "local":
        log.close()
        out["event_log"] = log.uri
    else:
        out["grpc"] = api.stats()
        api.close()
    print(json.dumps(out))


@app.command()
def serve(
    world_dir: Optional[Path] = typer.Option(None, "--world", help="Bootstrap posts/follows from this world export; "
                                             "the server clock then continues from the world's end"),
    port: int = typer.Option(0, help="gRPC port (default serving.port)"),
    workers: int = typer.Option(0, help="Server processes sharing the port (default serving.workers)"),
    describe: bool = typer.Option(False, "--describe", help="Print the pipelines component by component and exit"),
    log_format: str = typer.Option("json", help="json (one object per line, with request ids) or text"),
    worker_index: int = typer.Option(-1, hidden=True),
    clock_origin: str = typer.Option("", hidden=True, help="wall0_ms,sim0_ms,world_end_ms from the supervisor"),
) -> None:
    """Start the gRPC FeedService (health checking and reflection on; Prometheus on serving.metrics_port + i).

    With several workers (serving.workers) this process supervises that many server
    processes bound to the same port (SO_REUSEPORT); the kernel spreads connections."""
    import signal

    from core.services import ServiceError
    if describe:
        from serving.feed import describe_declared

        print("\n".join(describe_declared()))
        return
    from serving.logs import configure

    configure(log_format)
    cfg = _cfg()
    from serving.edge import Authenticator, InsecureConfig

    try:  # keys checked before anything starts (a supervisor would restart refused workers forever)
        Authenticator.from_config(cfg)
    except InsecureConfig as e:
        _fail(str(e), 2)
    from runtime.serve import publish_clock, run_worker, supervise_workers

    n = workers or cfg.serving.workers
    port = port or cfg.serving.port
    origin: dict[str, int] = {}
    if clock_origin:  # a worker: the supervisor's clock, so every worker (and restarted ones) agree
        origin = dict(zip(("wall0_ms", "sim0_ms", "world_end_ms"), (int(v) for v in clock_origin.split(","))))
    elif world_dir is not None:  # the supervisor (or the only process) fixes the clock
        try:
            origin = publish_clock(cfg, world_dir)
        except ServiceError as e:
            _fail(str(e))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    if n > 1 and worker_index < 0:
        # the same interpreter and entry point however this one was started (console script or -m)
        argv = [sys.executable, "-m", "feedrank.cli", "serve", "--port", str(port), "--log-format", log_format,
                "--workers", str(n)]
        if world_dir is not None:
            argv += ["--world", str(world_dir), "--clock-origin",
                     ",".join(str(origin[k]) for k in ("wall0_ms", "sim0_ms", "world_end_ms"))]
        console.print(f"FeedService: {n} workers on {cfg.serving.host}:{port} "
                      f"(metrics :{cfg.serving.metrics_port}..{cfg.serving.metrics_port + n - 1}); Ctrl-C stops")
        supervise_workers(argv, n, stop, say=console.print)
        return
    try:
        run_worker(cfg, world_dir, origin, port, max(worker_index, 0), reuse_port=n > 1, stop=stop, say=console.print)
    except ServiceError as e:
        _fail(str(e))


@app.command()
def token(user_id: int, admin: bool = typer.Option(False), ttl_s: float = typer.Option(3600.0)) -> None:
    """Print a bearer token for USER_ID signed with serving.jwt_secret (for grpcurl and scripts); it carries
    serving.jwt_issuer / jwt_audience when set and lives at most serving.jwt_max_lifetime_s."""
    from serving.edge import InsecureConfig, config_token

    try:
        print(config_token(_cfg(), user_id, admin, ttl_s))
    except (InsecureConfig, ValueError) as e:
        _fail(str(e), 2)


# ----------------------------------------------------------------------------- events & jobs


@events_app.command("stats")
def events_stats() -> None:
    """Count sealed events by type in the configured event log (reads it all). Events that are not
    UTF-8, not JSON (a torn line) or not a JSON object are skipped and counted, never a crash."""
    from collections import Counter

    from features.eventlog import open_configured_event_log, read_all

    log = open_configured_event_log(_cfg())
    reader = log.reader()
    lines = read_all(reader, idle_s=1.0)
    log.close()
    counts: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    if getattr(reader, "skipped", 0):
        skipped["not_utf8"] = reader.skipped  # counted by the file:// reader
    for x in lines:
        try:
            ev = json.loads(x)
        except ValueError:
            skipped["not_json"] += 1
            continue
        if not isinstance(ev, dict):
            skipped["not_an_object"] += 1
            continue
        counts[str(ev.get("type", "?"))] += 1
    print(json.dumps({"events": sum(counts.values()), "by_type": dict(counts), "skipped": sum(skipped.values()),
                      "skipped_by_reason": dict(skipped), "uri": log.uri}))


@jobs_app.command("run")
def jobs_run(
    job: str = typer.Argument(..., help="audit | features | learner"),
    expect: int = typer.Option(None, help="audit: stop after this many events (default: when idle); "
                                          "exit 1 if fewer arrive"),
    idle: float = typer.Option(10.0, help="audit: stop after this many seconds without new events, counted "
                                          "from the job's first output (until then: flink.startup_timeout_s)"),
    seconds: float = typer.Option(0.0, help="features/learner: stop after this long (0 = until Ctrl-C)"),
    fresh: bool = typer.Option(False, "--fresh", help="features/learner: ignore retained checkpoints and start from "
                                                      "the beginning of the event log"),
) -> None:
    """Run a PyFlink job embedded (local MiniCluster, thread mode).

    audit prints its counts as JSON; it exits 1 (one line, no JSON) when it read no event within
    flink.startup_timeout_s ("no events in <uri> within N s", or the job did not start) and when
    --expect events did not all arrive: 0 events is never a result. features and learner run until
    stopped and show their progress (also in Redis: feedrank:jobs:<job>:progress). They resume from
    their newest retained checkpoint on this event log (kept when the job is stopped or its JVM dies)."""
    from core.services import ServiceError

    cfg = _cfg()
    if job in ("features", "learner"):
        from runtime.jobrun import JobRunError, run_streaming_job

        try:
            print(json.dumps(run_streaming_job(cfg, job, seconds, resume=not fresh, say=console.print)))
        except JobRunError as e:
            _fail(str(e))
        return
    if job != "audit":
        _fail(f"unknown job {job!r} (available: audit, features, learner)")
    from jobs.audit import run_embedded

    try:
        result = run_embedded(cfg, expect=expect, idle_s=idle, on_progress=lambda n: console.print(f"  {n} events", end="\r"))
    except ServiceError as e:
        _fail(str(e))
    if expect is not None and result["events"] < expect:
        why = {"idle": f"no new event in {cfg.events.uri} for {idle:g} s", "max_s": "it ran for its 600 s limit"}
        _fail(f"audited {result['events']} of the {expect} events expected: "
              f"{why.get(result['stopped'], 'the job ended by itself')}")
    print(json.dumps(result))


def _world_dir(cfg, data: Optional[Path]) -> Path:
    d = data or cfg.data_dir / "sim" / f"{cfg.sim.scale}-{cfg.sim.seed}"
    if not (d / "ground_truth.npz").exists():
        _fail(f"no simulated world at {d}: run `feedrank sim generate` (or pass --data)")
    return d


class _StageProgress:
    """One rich progress bar per named stage, fed by (stage, fraction) callbacks."""

    def __init__(self, prog: Any):
        self.prog, self.tasks = prog, {}

    def __call__(self, stage: str, frac: float) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.prog.add_task(stage, total=1.0)
        self.prog.update(self.tasks[stage], completed=frac)


@app.command()
def train(
    what: str = typer.Argument("all", help="two-tower | light | heavy | all"),
    data: Optional[Path] = typer.Option(None, help="Simulated world directory (default: var/sim/<scale>-<seed>)"),
    heavy_rows: Optional[int] = typer.Option(None, help="Training impressions sampled for the rankers (default: training.heavy_rows)"),
    epochs: Optional[int] = typer.Option(None, help="Two-tower epochs (default: training.two_tower_epochs)"),
) -> None:
    """Train models on the simulator's logs (time-based split) and publish + promote them."""
    import torch

    from models.train import train_all

    if what not in ("two-tower", "light", "heavy", "all"):
        _fail(f"unknown model {what!r}: two-tower | light | heavy | all")
    cfg = _cfg()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    d = _world_dir(cfg, data)
    with _progress() as prog:
        out = train_all(cfg, str(d), what, tt_epochs=epochs, heavy_rows=heavy_rows, progress=_StageProgress(prog))
    print(json.dumps({k: v for k, v in out.items() if k not in ("trained", "data")}, default=str))


@app.command("eval")
def eval_(
    what: str = typer.Argument("models", help="models (offline model evaluation) | experiments (feed variants)"),
    dataset: str = typer.Option("sim", help="models: sim | ml-100k"),
    json_out: Path = typer.Option(None, "--json", help="Metrics JSON path (report.md and PNGs go beside it)"),
    data: Optional[Path] = typer.Option(None, help="Simulated world directory"),
    users: int = typer.Option(300, help="experiments: simulated users"),
    minutes: float = typer.Option(60.0, help="experiments: simulated minutes per variant"),
    only: str = typer.Option("variants,position_bias,trend_shift", help="experiments: which comparisons"),
    trend_minutes: float = typer.Option(40.0, help="experiments: simulated minutes per trend-shift arm"),
    speed: float = typer.Option(8.0, help="experiments: trend shift runs this many times faster than real time"),
) -> None:
    """Offline evaluation (trains on the time split), or `eval experiments`: feed variants (V0 chronological,
    V1 follow graph + rankers, V2 full funnel, ablations) on the simulator's ground truth."""
    from datetime import datetime, timezone

    from core.config import PROJECT_ROOT

    cfg = _cfg()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if what == "experiments":
        from lab.bench import scratch_removed_on_success
        from lab.experiments import run_experiments

        d = _world_dir(cfg, data)
        from lab.experiments import PARTS

        parts = tuple(p.strip() for p in only.split(",") if p.strip())
        if not parts or set(parts) - set(PARTS):
            _fail(f"--only takes a comma-separated subset of {', '.join(PARTS)}")
        json_out = json_out or PROJECT_ROOT / "reports" / f"experiments-{stamp}" / "experiments.json"
        with _progress() as prog, scratch_removed_on_success():
            res = run_experiments(cfg, d, json_out, users=users, minutes=minutes, progress=_StageProgress(prog),
                                  parts=parts, trend_minutes=trend_minutes, speed=speed)
        shown = ("utility_total", "utility_per_examined", "ctr", "ndcg@20_vs_true_utility")
        print(json.dumps({"checks": res["checks"], "wall_seconds": res["wall_seconds"],
                          **{n: {k: r[k] for k in shown} for n, r in res.get("variants", {}).items()}}))
        console.print(f"report: {json_out.parent / 'report.md'}")
        return
    if what != "models":
        _fail("eval what: models or experiments")
    json_out = json_out or PROJECT_ROOT / "reports" / f"eval-{dataset}-{stamp}" / "metrics.json"
    if dataset == "sim":
        from models.evaluate import evaluate_sim
        from sim.world import World

        d = _world_dir(cfg, data)
        with _progress() as prog:
            res = evaluate_sim(cfg, str(d), json_out, World.load(d), progress=_StageProgress(prog))
        summary = {"retrieval_recall@8000": res["retrieval"]["two_tower"].get(8000), "ndcg": res["ndcg"],
                   "click_auc": res["heads"]["heavy"]["auc"]["click"],
                   "click_auc_observed": res["heads"]["heavy"]["auc_observed"]["click"],
                   "position_bias_max_rel_error": res["position_bias"]["max_rel_error_pos1_10"]}
    elif dataset == "ml-100k":
        from models.evaluate import write_ml100k_report
        from models.movielens import evaluate as ml_eval

        with _progress() as prog:
            stage = _StageProgress(prog)
            res = ml_eval(cfg.data_dir / "cache", progress=lambda f: stage("two-tower (ml-100k)", f))
        write_ml100k_report(res, json_out)
        summary = {k: res[k] for k in ("popularity", "bpr_mf", "two_tower")}
    else:
        _fail("dataset must be sim or ml-100k")
    print(json.dumps(summary))
    console.print(f"report: {json_out.parent / 'report.md'}")


@models_app.command("list")
def models_list(model: Optional[str] = typer.Argument(None),
                as_json: bool = typer.Option(False, "--json", help="One JSON object per version instead of a table")) -> None:
    """Versions per model, with the current one marked (version ids are never cut)."""
    from datetime import datetime

    from models.store import ModelStore

    store = ModelStore.from_config(_cfg())
    rows: list[dict[str, Any]] = []
    for m in [model] if model else store.models():
        cur = store.current(m)
        for v in store.versions(m):
            try:
                ck = store.meta(m, v)
            except Exception as e:  # noqa: BLE001 - show unreadable versions rather than hide them
                rows.append({"model": m, "version": v, "current": v == cur, "error": str(e)})
                continue
            rows.append({"model": m, "version": v, "current": v == cur,
                         "created": datetime.fromtimestamp(ck.created_at).strftime("%Y-%m-%d %H:%M:%S"),
                         "parent": ck.parent or "",
                         "metrics": {k: x for k, x in ck.metrics.items() if not isinstance(x, (list, dict))}})
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    t = Table("model", "version", "current", "created", "parent", "metrics")
    for r in rows:
        t.add_row(r["model"], r["version"], "*" if r["current"] else "", r.get("created", ""), r.get("parent", ""),
                  f"[red]{r['error']}[/red]" if "error" in r else json.dumps(r["metrics"])[:60])
    for col in t.columns[:2] + t.columns[4:5]:
        col.no_wrap = True  # ids stay whole: a narrow terminal cuts the metrics column instead
    Console(width=max(Console().width, 160)).print(t)


@models_app.command("promote")
def models_promote(model: str, version: str) -> None:
    """Make VERSION current (after verifying every checksum)."""
    from models.store import ModelStore, ModelStoreError

    try:
        ModelStore.from_config(_cfg()).promote(model, version)
    except ModelStoreError as e:
        _fail(str(e))
    console.print(f"{model}: current = {version}")


@models_app.command("rollback")
def models_rollback(model: str) -> None:
    """Point current back at the previous current version."""
    from models.store import ModelStore, ModelStoreError

    try:
        v = ModelStore.from_config(_cfg()).rollback(model)
    except ModelStoreError as e:
        _fail(str(e))
    console.print(f"{model}: rolled back to {v}")


@models_app.command("retention")
def models_retention(model: str) -> None:
    """Delete versions outside the retention policy (model_store.retention_*)."""
    from models.store import ModelStore

    deleted = ModelStore.from_config(_cfg()).apply_retention(model)
    console.print(f"{model}: deleted {len(deleted)} versions")


@feast_app.command("configure")
def feast_configure() -> None:
    """Write feast_repo/feature_store.yaml from feedrank.toml (Redis address, registry path)."""
    from features.feast_repo import configure

    console.print(f"written {configure(_cfg())}")


@feast_app.command("export")
def feast_export(world: Optional[Path] = typer.Option(None, help="Simulated world directory")) -> None:
    """Write the offline sources (Parquet under var/feast) from a simulated world's logs."""
    from features.feast_repo import export

    cfg = _cfg()
    print(json.dumps(export(cfg, _world_dir(cfg, world))))


def _write_bench(name: str, res: dict) -> None:
    """A bench's result: JSON + markdown under bench/results/, the JSON on stdout."""
    from lab.bench import write_result

    path = write_result(name, res)
    print(json.dumps(res))
    console.print(f"written to {path}")


def _rps_levels(rps: str) -> tuple[float, ...]:
    """``--rps 20,50,100`` -> (20.0, 50.0, 100.0), or a clear error."""
    try:
        levels = tuple(float(x) for x in rps.split(",") if x.strip())
    except ValueError:
        _fail(f"--rps must be numbers separated by commas, got {rps!r}")
    if not levels or min(levels) <= 0:
        _fail(f"--rps needs at least one positive load, got {rps!r}")
    return levels


@bench_app.callback()
def bench_all_cmd(ctx: typer.Context,
                  rps: str = typer.Option("20,50,100,150", help="GetFeed offered loads, requests/s"),
                  seconds: float = typer.Option(30.0, help="Seconds per load level"),
                  scales: str = typer.Option("small,large", help="World scales for GetFeed latency (existing worlds)")) -> None:
    """Every benchmark: GetFeed latency vs load per scale, retrieval, rankers, feature-job throughput,
    freshness, event -> promoted-model serving delay; then bench/results/summary-<stamp>.md."""
    if ctx.invoked_subcommand is not None:
        return
    from lab.bench_all import run_all

    levels = _rps_levels(rps)
    with _progress() as prog:
        try:
            path, results = run_all(_cfg(), levels, seconds, tuple(s.strip() for s in scales.split(",") if s.strip()),
                                    progress=_StageProgress(prog))
        except RuntimeError as e:
            _fail(str(e))
    failed = [k for k, v in results.items() if "error" in v]
    console.print(f"summary: {path}" + (f" ([red]failed: {', '.join(failed)}[/red])" if failed else ""))
    if failed:
        raise typer.Exit(1)


@bench_app.command("model-delay")
def bench_model_delay_cmd(users: int = typer.Option(300, help="Simulated users (real time)"),
                          minutes: float = typer.Option(5.0, help="Minutes of traffic")) -> None:
    """Event -> promoted model serving: the online learner and the FeedService in real time."""
    from lab.bench import scratch_removed_on_success, write_result
    from lab.bench_model_delay import bench_model_delay

    cfg = _cfg()
    with _progress() as prog, scratch_removed_on_success():
        try:
            res = bench_model_delay(cfg, _world_dir(cfg, None), users, minutes, progress=_StageProgress(prog))
        except RuntimeError as e:
            _fail(str(e))
    path = write_result("model-delay", res)
    print(json.dumps({k: v for k, v in res.items() if k != "promotions"}))
    console.print(f"written to {path}")


@bench_app.command("retrieval")
def bench_retrieval(
    scale: str = typer.Option("large", help="World scale whose posts are indexed (large = 1M posts)"),
    k: int = typer.Option(8000, help="Candidates per query"),
    queries: int = typer.Option(1000, help="Queries timed for latency"),
) -> None:
    """FAISS recall@k vs exact search and per-query latency (1 thread) over a world's posts."""
    from lab.bench import bench_retrieval as run, write_result

    cfg = _cfg()
    d = cfg.data_dir / "sim" / f"{scale}-{cfg.sim.seed}"
    if not (d / "ground_truth.npz").exists():
        from sim.generate import generate

        with _progress() as prog:
            sp = _StageProgress(prog)
            generate(cfg, scale, cfg.sim.seed, d, progress=lambda s, f: sp(f"generating {scale} world", f))
    with _progress() as prog:
        res = run(cfg, d, k=k, n_latency=queries, progress=_StageProgress(prog))
    path = write_result("retrieval", res)
    print(json.dumps({k_: res[k_] for k_ in ("posts", "k", "nlist", "nprobe", "recall_vs_exact", "latency_ms")}))
    console.print(f"written to {path}")


@bench_app.command("rankers")
def bench_rankers() -> None:
    """Light ranker over 10K candidates and TorchScript heavy ranker over 500 (current models, 1 thread)."""
    from lab.bench import bench_rankers as run

    res = run(_cfg())
    _write_bench("rankers", res)


EVENTS_HELP = ("Event log of the bench's own stack: kafka (a local Apache Kafka broker on a free port), "
               "kafka://host:port/topic (port 0 = free), or file (the segment log)")


@bench_app.command("features")
def bench_features_cmd(count: int = typer.Option(300_000, "--count", help="Events written, then read by the job"),
                       log: str = typer.Option("kafka", "--events", help=EVENTS_HELP)) -> None:
    """Throughput of the real-time feature job (events/s), on its own embedded stack."""
    from lab.bench import bench_features as run, scratch_removed_on_success

    with _progress() as prog, scratch_removed_on_success():
        try:
            res = run(_cfg(), n=count, progress=_StageProgress(prog), events=log)
        except ValueError as e:
            _fail(str(e))
    _write_bench("features", res)


@bench_app.command("freshness")
def bench_freshness_cmd(probes: int = typer.Option(200, help="Timed clicks"),
                        background: float = typer.Option(2000.0, help="Background load, events/s"),
                        log: str = typer.Option("kafka", "--events", help=EVENTS_HELP)) -> None:
    """Event append -> feature visible (serving cache and Feast), p50/p99, under background load."""
    from lab.bench import bench_freshness as run, scratch_removed_on_success

    with _progress() as prog, scratch_removed_on_success():
        try:
            res = run(_cfg(), probes=probes, background_eps=background, progress=_StageProgress(prog), events=log)
        except ValueError as e:
            _fail(str(e))
    _write_bench("freshness", res)


@bench_app.command("serve")
def bench_serve_cmd(scale: str = typer.Option("large", help="World scale (its world must exist: `feedrank sim generate`)"),
                    rps: str = typer.Option("20", help="Comma-separated offered loads, requests/s"),
                    seconds: float = typer.Option(30.0, help="Seconds per load level"),
                    workers: int = typer.Option(0, help="Server processes (default serving.workers)"),
                    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the JSON result here")) -> None:
    """GetFeed latency over gRPC vs load (open loop), per-stage breakdown and server RSS."""
    from lab.bench import scratch_removed_on_success, write_result
    from lab.bench_serve import bench_serve

    levels = _rps_levels(rps)
    with _progress() as prog, scratch_removed_on_success():
        try:
            res = bench_serve(_cfg(), scale, levels, seconds, progress=_StageProgress(prog), workers=workers)
        except RuntimeError as e:
            _fail(str(e))
    path = write_result("serve", res)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    console.print(f"written to {path}")


@bench_app.command("signals")
def bench_signals_cmd(scale: str = typer.Option("small", help="World scale (its world must exist, and `feedrank train` models)"),
                      clients: str = typer.Option("1,8,16,32", help="Comma-separated concurrent clients (closed loop)"),
                      seconds: float = typer.Option(20.0, help="Seconds per level"),
                      signals: int = typer.Option(10, help="Signals per SubmitSignals call (events per append)"),
                      workers: int = typer.Option(0, help="Server processes (default serving.workers)"),
                      log: str = typer.Option("file", "--events", help=EVENTS_HELP),
                      fsync: bool = typer.Option(True, help="--no-fsync: the server acknowledges file:// appends "
                                                 "before they reach the disk (the cost of durability, as a baseline)"),
                      log_only: bool = typer.Option(False, "--log-only", help="Only the file:// event log, in this "
                                                    "process: group commit with fsync on and off (no world or server)")) -> None:
    """SubmitSignals throughput and p99 over gRPC (closed loop), then the file:// log's group commit alone."""
    from lab.bench import scratch_removed_on_success
    from lab.bench_signals import bench_event_log_only, bench_signals

    try:
        levels = tuple(int(x) for x in clients.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) <= 0:
        _fail(f"--clients needs positive integers separated by commas, got {clients!r}")
    cfg = _cfg()
    with _progress() as prog, scratch_removed_on_success():
        try:
            if log_only:
                res = bench_event_log_only(cfg, levels, seconds, signals, progress=_StageProgress(prog))
            else:
                res = bench_signals(cfg, scale, levels, seconds, signals, events=log, progress=_StageProgress(prog),
                                    workers=workers, fsync=fsync)
        except (RuntimeError, ValueError) as e:
            _fail(str(e))
    _write_bench("signals", res)


@bench_app.command("soak")
def bench_soak_cmd(scale: str = typer.Option("small", help="World scale (its world must exist: `feedrank sim generate`)"),
                   minutes: float = typer.Option(30.0, help="Minutes of load (warm-up: the first 5, or a third if < 10)"),
                   getfeed_rps: float = typer.Option(20.0, help="GetFeed calls/s (open loop, a population of users)"),
                   signals_rps: float = typer.Option(10.0, help="SubmitSignals calls/s (1-5 signals about served items)"),
                   workers: int = typer.Option(0, help="Server processes (default serving.workers)")) -> None:
    """Memory under ordinary traffic: worker RSS sampled every 10 s; goal growth after warm-up <= 5%, 0 errors."""
    from lab.bench import scratch_removed_on_success
    from lab.bench_soak import bench_soak, write_soak

    with _progress() as prog, scratch_removed_on_success():
        try:
            res = bench_soak(_cfg(), scale, minutes, getfeed_rps, signals_rps, workers, progress=_StageProgress(prog))
        except RuntimeError as e:
            _fail(str(e))
    path, png = write_soak(res)
    print(json.dumps(res))
    g = res["rss_growth_after_warmup"]["total"]
    console.print(f"RSS growth after warm-up {g:+.1%} (goal <= {res['goal']['rss_growth_max']:.0%}), "
                  f"errors {res['errors']['total']}, signals accepted {res['signals']['accepted']} of "
                  f"{res['signals']['sent']}: {'[green]passed' if res['passed']['all'] else '[red]FAILED'}[/]")
    console.print(f"written to {path} and {png}")


@app.command()
def demo(
    scale: str = typer.Option("small", help="World scale (small | medium | large)"),
    users: int = typer.Option(300, help="Simulated users"),
    minutes: float = typer.Option(3.0, help="Minutes of simulated client traffic (real time)"),
    retrain: bool = typer.Option(False, help="Train new models even if current ones exist for this world"),
    keep_up: bool = typer.Option(False, help="Leave the stack running afterwards"),
) -> None:
    """The whole system end to end: stack, world, models, Feast, PyFlink jobs, gRPC FeedService,
    simulated clients with a trend shift; ends with a report under reports/<timestamp>/."""
    from lab.demo import run_demo

    sys.exit(run_demo(_cfg(), scale=scale, users=users, minutes=minutes, keep_up=keep_up, console=console,
                      retrain=retrain))


if __name__ == "__main__":
    app()
