"""The stack: Redis and Kafka (`up`, `down`, `status`), the standalone Flink cluster, configuration, the event log, the Feast repository."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from feedrank.cli.common import app, flink_app, config_app, events_app, feast_app, console, load_cfg, fail, resolve_world


@app.command()
def up() -> None:
    """Start Redis, prepare the event log, and start a local Apache Kafka broker when the event log is kafka://."""
    from runtime import stack
    from core.services import ServiceError

    cfg = load_cfg()
    try:
        for name, outcome in stack.up(cfg):
            console.print(f"[green]✓[/green] {name}: {outcome}")
    except ServiceError as e:
        fail(str(e))


@app.command()
def down() -> None:
    """Stop everything `up` (and `flink up`) started; nothing else."""
    from runtime import stack

    for name, outcome in stack.down(load_cfg()):
        console.print(f"{name}: {outcome}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Health of each service of the embedded stack. Exit code 1 if any is unhealthy."""
    from runtime import stack

    rows = stack.status(load_cfg())
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


@flink_app.command("up")
def flink_up() -> None:
    """Start the standalone cluster (conf, logs, pids under var/flink)."""
    from runtime import flink
    from core.services import ServiceError

    try:
        console.print(f"[green]✓[/green] flink: {flink.cluster_up(load_cfg())}")
    except ServiceError as e:
        fail(str(e))


@flink_app.command("down")
def flink_down() -> None:
    """Stop the standalone cluster started by `feedrank flink up`."""
    from runtime import flink

    console.print(f"flink: {flink.cluster_down(load_cfg())}")


@flink_app.command("status")
def flink_status() -> None:
    """Cluster overview from the REST API."""
    from runtime import flink

    cfg = load_cfg()
    ov = flink.rest_overview(cfg)
    print(json.dumps({"running": ov is not None, "pids": flink.cluster_pids(cfg), "overview": ov}, indent=2))
    if ov is None:
        raise typer.Exit(1)


def checkpointed_job(job_py: Path) -> str | None:
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

    cfg = load_cfg()
    name = checkpointed_job(job)
    running = flinkenv.running_jobs(cfg)
    twin = [jid for jid, n in running.items() if name and n == f"feedrank-{name}"]
    if twin:  # two copies of a job on one log would count every event twice
        fail(f"the {name} job already runs on this cluster (job {twin[0]}): cancel it first "
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
        fail(f"{e}{' (a checkpoint of other code or configuration: try --fresh)' if restore else ''}")
    done = "checkpointing off" if checkpoints is None else f"{checkpoints} checkpoint{'s' * (checkpoints > 1)} completed"
    console.print(f"[green]✓[/green] {job.name}: job {job_id} running, {done}")


@flink_app.command("env")
def flink_env() -> None:
    """Print `export` lines for a plain `flink run` against this cluster: eval "$(feedrank flink env)".

    FLINK_HOME, FLINK_CONF_DIR / FLINK_LOG_DIR / FLINK_PID_DIR under var/flink (never site-packages),
    PYTHONPATH and PYFLINK_CLIENT_EXECUTABLE for the venv, PATH with pyflink's bin (the `flink`
    script) first; the same variables `flink up` and `flink submit` use (runtime.flink.cluster_variables)."""
    from runtime import flink

    cfg = load_cfg()
    if not (flink.cluster_dirs(cfg)["conf"] / "config.yaml").exists():
        console.print(f"[yellow]note[/yellow]: no cluster conf in {flink.cluster_dirs(cfg)['conf']} yet: "
                      "run `feedrank flink up` first")
    sys.stdout.write(flink.shell_exports(cfg))


@config_app.command("check")
def config_check() -> None:
    """Validate the configuration; exit 2 naming the key and reason if invalid."""
    load_cfg()
    console.print("[green]configuration is valid[/green]")


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration as JSON."""
    print(load_cfg().model_dump_json(indent=2))


@events_app.command("stats")
def events_stats() -> None:
    """Count sealed events by type in the configured event log (reads it all). Events that are not
    UTF-8, not JSON (a torn line) or not a JSON object are skipped and counted, never a crash."""
    from collections import Counter

    from features.eventlog import open_configured_event_log, read_all

    log = open_configured_event_log(load_cfg())
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


@feast_app.command("configure")
def feast_configure() -> None:
    """Write feast_repo/feature_store.yaml from feedrank.toml (Redis address, registry path)."""
    from features.feast_repo import configure

    console.print(f"written {configure(load_cfg())}")


@feast_app.command("export")
def feast_export(world: Optional[Path] = typer.Option(None, help="Simulated world directory")) -> None:
    """Write the offline sources (Parquet under var/feast) from a simulated world's logs."""
    from features.feast_repo import export

    cfg = load_cfg()
    print(json.dumps(export(cfg, resolve_world(cfg, world))))


k8s_app = typer.Typer(help="Kubernetes manifests generated from feedrank.toml (deploy/k8s/).", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(out: Optional[Path] = typer.Option(None, help="Where to write them (default deploy/k8s/feedrank.yaml)"),
               check: bool = typer.Option(False, "--check", help="Validate and compare with OUT instead of writing")) -> None:
    """Write the manifests (FeedService Deployment + Service + HPA, Redis, Strimzi Kafka, the streaming jobs as
    FlinkDeployments, the daily CronJob), validated against the Kubernetes schemas (k8s.k8s_version) and the
    Flink operator's CRD schema (fetched by `make jvm`)."""
    from core.config import PROJECT_ROOT
    from core.jvm import ensure
    from runtime.k8s import crd_schemas, manifests, render, validate

    cfg = load_cfg()
    out = out or PROJECT_ROOT / "deploy" / "k8s" / "feedrank.yaml"
    ensure(cfg)  # the operators' CRD schemas come with the JVM artifacts
    res = validate(manifests(cfg), cfg.k8s.k8s_version, crd_schemas(cfg))
    if res["errors"]:
        fail("invalid manifests: " + "; ".join(res["errors"]))
    text = render(cfg)
    if check:
        if not out.exists() or out.read_text() != text:
            fail(f"{out} is not what feedrank.toml renders: run `feedrank k8s render`")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    for w in res["warnings"]:
        console.print(f"warning: {w}")
    console.print(f"{out}: {len(res['validated'])} resources valid against Kubernetes {cfg.k8s.k8s_version}, "
                  f"{len(res['validated_crd'])} against their operator's CRD; custom resources without a schema "
                  f"here: {', '.join(res['not_validated'])}")
