"""The lab: `bench` and its sub-commands, `demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from feedrank.cli.common import app, bench_app, experiments_app, console, load_cfg, fail, progress_bars, resolve_world, StageProgress, write_bench, rps_levels


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

    levels = rps_levels(rps)
    with progress_bars() as prog:
        try:
            path, results = run_all(load_cfg(), levels, seconds, tuple(s.strip() for s in scales.split(",") if s.strip()),
                                    progress=StageProgress(prog))
        except RuntimeError as e:
            fail(str(e))
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

    cfg = load_cfg()
    with progress_bars() as prog, scratch_removed_on_success():
        try:
            res = bench_model_delay(cfg, resolve_world(cfg, None), users, minutes, progress=StageProgress(prog))
        except RuntimeError as e:
            fail(str(e))
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

    cfg = load_cfg()
    d = cfg.data_dir / "sim" / f"{scale}-{cfg.sim.seed}"
    if not (d / "ground_truth.npz").exists():
        from sim.generate import generate

        with progress_bars() as prog:
            sp = StageProgress(prog)
            generate(cfg, scale, cfg.sim.seed, d, progress=lambda s, f: sp(f"generating {scale} world", f))
    with progress_bars() as prog:
        res = run(cfg, d, k=k, n_latency=queries, progress=StageProgress(prog))
    path = write_result("retrieval", res)
    print(json.dumps({k_: res[k_] for k_ in ("posts", "k", "nlist", "nprobe", "recall_vs_exact", "latency_ms")}))
    console.print(f"written to {path}")


@bench_app.command("rankers")
def bench_rankers() -> None:
    """Light ranker over 10K candidates and TorchScript heavy ranker over 500 (current models, 1 thread)."""
    from lab.bench import bench_rankers as run

    res = run(load_cfg())
    write_bench("rankers", res)


EVENTS_HELP = ("Event log of the bench's own stack: kafka (a local Apache Kafka broker on a free port), "
               "kafka://host:port/topic (port 0 = free), or file (the segment log)")


@bench_app.command("features")
def bench_features_cmd(count: int = typer.Option(300_000, "--count", help="Events written, then read by the job"),
                       log: str = typer.Option("kafka", "--events", help=EVENTS_HELP)) -> None:
    """Throughput of the real-time feature job (events/s), on its own embedded stack."""
    from lab.bench import bench_features as run, scratch_removed_on_success

    with progress_bars() as prog, scratch_removed_on_success():
        try:
            res = run(load_cfg(), n=count, progress=StageProgress(prog), events=log)
        except ValueError as e:
            fail(str(e))
    write_bench("features", res)


@bench_app.command("lake")
def bench_lake_cmd(pages: int = typer.Option(3000, help="Served pages written (each ~22 events, one of ~33 KB)"),
                   log: str = typer.Option("kafka", "--events", help=EVENTS_HELP),
                   workers: int = typer.Option(1, help="Beam DirectRunner processes for the training set (see README)")) -> None:
    """The lake job's events/s and the training-set pipeline's rows/s, on their own embedded stack."""
    from lab.bench import scratch_removed_on_success
    from lab.bench_lake import bench_lake

    with progress_bars() as prog, scratch_removed_on_success():
        try:
            res = bench_lake(load_cfg(), pages=pages, events=log, workers=workers, progress=StageProgress(prog))
        except (ValueError, TimeoutError) as e:
            fail(str(e))
    write_bench("lake", res)


@bench_app.command("freshness")
def bench_freshness_cmd(probes: int = typer.Option(200, help="Timed clicks"),
                        background: float = typer.Option(2000.0, help="Background load, events/s"),
                        log: str = typer.Option("kafka", "--events", help=EVENTS_HELP)) -> None:
    """Event append -> feature visible (serving cache and Feast), p50/p99, under background load."""
    from lab.bench import bench_freshness as run, scratch_removed_on_success

    with progress_bars() as prog, scratch_removed_on_success():
        try:
            res = run(load_cfg(), probes=probes, background_eps=background, progress=StageProgress(prog), events=log)
        except ValueError as e:
            fail(str(e))
    write_bench("freshness", res)


@bench_app.command("serve")
def bench_serve_cmd(scale: str = typer.Option("large", help="World scale (its world must exist: `feedrank sim generate`)"),
                    rps: str = typer.Option("20", help="Comma-separated offered loads, requests/s"),
                    seconds: float = typer.Option(30.0, help="Seconds per load level"),
                    workers: int = typer.Option(0, help="Server processes (default serving.workers)"),
                    shadow: bool = typer.Option(False, "--shadow", help="Run each level again with a shadow candidate "
                                                "scoring every HOME page (its cost on the latency budget)"),
                    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the JSON result here")) -> None:
    """GetFeed latency over gRPC vs load (open loop), per-stage breakdown and server RSS."""
    from lab.bench import scratch_removed_on_success, write_result
    from lab.bench_serve import bench_serve

    levels = rps_levels(rps)
    with progress_bars() as prog, scratch_removed_on_success():
        try:
            res = bench_serve(load_cfg(), scale, levels, seconds, progress=StageProgress(prog), workers=workers,
                              shadow=shadow)
        except RuntimeError as e:
            fail(str(e))
    path = write_result("serve", res)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    for lv in res["levels"]:
        g = lv["goal"]
        console.print(f"{lv['offered_rps']:g} RPS: p99 {lv['latency_ms']['p99']} ms (goal {g['p99_goal_ms']:g} ms): "
                      + ("met" if g["met"] else "[red]NOT met[/red]: " + "; ".join(g["why_not"])))
    rc = res["retrieval"]["recall"]
    console.print(f"retrieval recall@{rc['k']} vs exact at nprobe {rc['nprobe']}: {rc['recall_at_k']} over "
                  f"{rc['queries']} users (goal >= {rc['goal']}): " + ("met" if rc["met"] else "[red]NOT met[/red]"))
    console.print(f"written to {path}")


@bench_app.command("cost")
def bench_cost_cmd(rps: float = typer.Option(10.0, help="Offered load of every run, requests/s (low: no queueing)"),
                   seconds: float = typer.Option(20.0, help="Seconds per run"),
                   ann_k: str = typer.Option("2000,4000,8000", help="ANN candidate counts run on the largest world")) -> None:
    """The cost curve: server CPU and GetFeed latency per request against the posts in the corpus (every
    generated world: 50K, 200K, 1M) and the candidates per request (the largest world). JSON + PNG."""
    from lab.bench import scratch_removed_on_success, write_result
    from lab.bench_cost import bench_cost, plot_cost

    ks = tuple(int(x) for x in rps_levels(ann_k))
    with progress_bars() as prog, scratch_removed_on_success():
        try:
            res = bench_cost(load_cfg(), rps, seconds, ks, progress=StageProgress(prog))
        except RuntimeError as e:
            fail(str(e))
    path = write_result("cost", res)
    png = plot_cost(res, path.with_suffix(".png"))
    rows = ["| corpus | posts | ANN k | candidates / request | server CPU ms / request | p50 ms | p99 ms | RSS MB |",
            "|---|---|---|---|---|---|---|---|"]
    for p in res["by_posts"] + [q for q in res["by_ann_k"] if q["ann_k"] != res["by_posts"][-1]["ann_k"]]:
        rows.append(f"| {p['scale']} | {p['posts']:,} | {p['ann_k']} | {p['candidates_per_request']:,.0f} | "
                    f"{p['cpu_ms_per_request']} | {p['p50_ms']} | {p['p99_ms']} | {p['server_rss_mb']:,.0f} |")
    md = path.with_suffix(".md")
    md.write_text("\n".join([f"# bench: cost ({path.stem})", "", *rows, "", f"![cost curve]({png.name})", "",
                              md.read_text()]))
    console.print("\n".join(rows))
    console.print(f"written to {path} and {png}")


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
        fail(f"--clients needs positive integers separated by commas, got {clients!r}")
    cfg = load_cfg()
    with progress_bars() as prog, scratch_removed_on_success():
        try:
            if log_only:
                res = bench_event_log_only(cfg, levels, seconds, signals, progress=StageProgress(prog))
            else:
                res = bench_signals(cfg, scale, levels, seconds, signals, events=log, progress=StageProgress(prog),
                                    workers=workers, fsync=fsync)
        except (RuntimeError, ValueError) as e:
            fail(str(e))
    write_bench("signals", res)


@bench_app.command("soak")
def bench_soak_cmd(scale: str = typer.Option("small", help="World scale (its world must exist: `feedrank sim generate`)"),
                   minutes: float = typer.Option(30.0, help="Minutes of load (warm-up: the first 5, or a third if < 10)"),
                   getfeed_rps: float = typer.Option(20.0, help="GetFeed calls/s (open loop, a population of users)"),
                   signals_rps: float = typer.Option(10.0, help="SubmitSignals calls/s (1-5 signals about served items)"),
                   workers: int = typer.Option(0, help="Server processes (default serving.workers)")) -> None:
    """Memory under ordinary traffic: worker RSS sampled every 10 s; goal growth after warm-up <= 5%, 0 errors."""
    from lab.bench import scratch_removed_on_success
    from lab.bench_soak import bench_soak, write_soak

    with progress_bars() as prog, scratch_removed_on_success():
        try:
            res = bench_soak(load_cfg(), scale, minutes, getfeed_rps, signals_rps, workers, progress=StageProgress(prog))
        except RuntimeError as e:
            fail(str(e))
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

    sys.exit(run_demo(load_cfg(), scale=scale, users=users, minutes=minutes, keep_up=keep_up, console=console,
                      retrain=retrain))


def _when(text: str, last_ms: int | None) -> int | None:
    """An ISO date/time (UTC unless it names a zone), or a duration (90m, 6h, 7d) before the last logged exposure."""
    import datetime as dt
    import re

    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text.strip())
    if m:
        if last_ms is None:
            return None
        return int(last_ms - float(m[1]) * {"m": 60_000, "h": 3_600_000, "d": 86_400_000}[m[2]])
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since/--until: {text!r} is neither an ISO date/time (2026-01-15, 2026-01-15T08:00) nor a duration (6h, 7d)")
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


@experiments_app.command("report")
def experiments_report(
    since: str = typer.Option("", help="From this ISO date/time (UTC), or a duration (6h, 7d) before the last exposure"),
    until: str = typer.Option("", help="Until this ISO date/time or duration before the last exposure"),
    file: Optional[Path] = typer.Option(None, help="Experiments file (default serving.experiments_file)"),
    out: Optional[Path] = typer.Option(None, help="Directory of report.{md,json,png} (default reports/experiments-report-<stamp>)"),
) -> None:
    """Per experiment and variant, from the lake's exposures and engagements: users, exposures, CTR, each head's
    rate, negative feedback, session depth with 95% CIs and the difference to control, a sample-ratio-mismatch
    check and the configured guardrails."""
    from datetime import datetime, timezone

    from core.config import PROJECT_ROOT
    from features.lake import read_table
    from lab.experiment_report import report, write
    from core.config import ConfigError

    cfg = load_cfg()
    ts = read_table(cfg, "exposures", columns=["ts"]).column("ts").to_numpy()
    last = int(ts.max()) if ts.size else None
    try:
        rep = report(cfg, file, _when(since, last), _when(until, last))
    except (ConfigError, OSError) as e:
        fail(str(e))
    if not rep["experiments"]:
        fail(f"no logged exposure names an experiment ({rep['exposures']:,} exposures in the window): "
             "run the lake job (`feedrank jobs run lake`) over traffic served with experiments.toml")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    paths = write(rep, out or PROJECT_ROOT / "reports" / f"experiments-report-{stamp}")
    from lab.experiment_report import markdown

    print(markdown(rep))
    console.print(f"written to {paths['md']} (+ .json, .png)")
