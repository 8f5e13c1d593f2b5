"""`feedrank demo` (= `make demo`): the whole system, end to end, on the embedded stack.

    1 stack          Redis + the event log: a local Apache Kafka broker (default) or the file:// segment log
    2 world          the simulated social world (small by default; --scale medium)
    3 models         two-tower + FAISS index, light and heavy rankers (trained unless current ones exist)
    4 features       Feast repo applied; the world's offline features exported and loaded online
    5 jobs           the PyFlink feature job and the online learner (each its own process and JVM)
    6 FeedService    gRPC server (`feedrank serve --world`)
    7 clients        simulated people scroll, engage, hide, follow; creators publish; a trend shift
                     happens midway; freshness probes every 10 s
    report           reports/<timestamp>/report.md + PNGs: utility and CTR over time, online-learning
                     decisions, per-stage latency, freshness, discovery share, re-rank constraints

Every figure in the report is measured in this run. Ctrl-C stops everything the demo started.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from core.config import PROJECT_ROOT, Config
from runtime.procs import ProcessGroup, child_env
from serving.edge import with_embedded_auth

#: Settings the demo runs the learner with: a few minutes of traffic from a few hundred users
#: must give the holdout enough examples for decisions (production: feedrank.toml defaults).
DEMO_LEARNER = {"FEEDRANK_ONLINE_LEARNING_HOLDOUT_FRACTION": "0.2", "FEEDRANK_ONLINE_LEARNING_MIN_HOLDOUT": "150",
                "FEEDRANK_ONLINE_LEARNING_MIN_HOLDOUT_POSITIVES": "10", "FEEDRANK_ONLINE_LEARNING_BATCH_SIZE": "32",
                "FEEDRANK_ONLINE_LEARNING_VALIDATE_EVERY_S": "30", "FEEDRANK_ONLINE_LEARNING_ATTRIBUTION_WINDOW_S": "30",
                "FEEDRANK_ONLINE_LEARNING_HOLDOUT_WINDOW_S": "600"}


def run_demo(cfg: Config, scale: str, users: int, minutes: float, keep_up: bool, console: Console,
             retrain: bool = False, report_root: Path | None = None) -> int:
    from runtime import stack

    t_start = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    report_dir = (report_root or PROJECT_ROOT / "reports") / stamp
    report_dir.mkdir(parents=True, exist_ok=True)
    log_dir = cfg.data_dir / "log" / f"demo-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    # this run's own event log (a directory, or a topic): the report covers this run, and the jobs
    # need not replay earlier demos
    uri = cfg.resolve_uri(cfg.events.uri).rstrip("/")
    uri = f"{uri}/demo-{stamp}" if uri.startswith("file://") else f"{uri}-demo-{stamp}"
    lake_uri = cfg.resolve_uri(cfg.lake.uri).rstrip("/") + f"/demo-{stamp}"  # this run's lake, like its event log
    cfg = cfg.model_copy(update={"events": cfg.events.model_copy(update={"uri": uri}),
                                 "lake": cfg.lake.model_copy(update={"uri": lake_uri})})
    # an embedded stack: its own random JWT and cursor keys, known to its server (through child_env) and its
    # simulated clients only; `feedrank serve` refuses the placeholders shipped in feedrank.toml
    cfg = with_embedded_auth(cfg)
    was_up = {s["name"] for s in stack.status(cfg) if s["healthy"] and s.get("pid")}
    procs = ProcessGroup(log_dir)
    exe = str(Path(sys.executable).parent / "feedrank")
    try:
        console.rule("1/8 embedded stack")
        for name, outcome in stack.up(cfg):
            console.print(f"[green]✓[/green] {name}: {outcome}")
        # the run owns the stack's Redis: an earlier run's posts would hold this run's post ids (the simulated
        # creators number new posts from the world's end) and its learner decisions would mix with this run's
        from features.connection import redis_client

        redis_client(cfg).flushdb()
        console.print("[green]✓[/green] redis: emptied for this run")
        wdir, meta = _world(cfg, scale, console)
        _models(cfg, wdir, retrain, console)
        _features(cfg, wdir, console)

        console.rule("5/8 PyFlink jobs: features, online learner, lake")
        env = child_env(cfg, FEEDRANK_STREAMING_BOOTSTRAP_WORLD=str(wdir), **DEMO_LEARNER)
        procs.start("feature-job", [exe, "jobs", "run", "features"], env)
        procs.start("learner", [exe, "jobs", "run", "learner"], env)
        procs.start("lake-job", [exe, "jobs", "run", "lake"], env)
        console.print(f"started (logs in {log_dir})")

        console.rule("6/8 FeedService (gRPC)")
        procs.start("serve", [exe, "serve", "--world", str(wdir), "--workers", "1"], env)
        address = f"{cfg.serving.host}:{cfg.serving.port}"
        _wait_healthy(address, procs, console)
        _wait_jobs(cfg, procs, console)

        console.rule(f"7/8 {users} simulated users for {minutes:g} minutes (trend shift at the midpoint)")
        from sim.world import World

        world = World.load(wdir)  # one world for every client phase: it holds the posts they publish
        run = _clients(cfg, world, users, minutes, address, procs, console)
        _drain(cfg, run, console)
        result = _collect(cfg, run, meta, time.perf_counter() - t_start)
        console.rule("8/8 compressed daily cycle on what the FeedService logged")
        from lab.demo_cycle import run_cycle

        result["daily_cycle"] = run_cycle(cfg, run["t0_ms"], max(0.5, minutes / 3), lambda m: _clients(
            cfg, world, users, m, address, procs, console, shift=False), console)
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        console.rule("report")
        path = write_report(report_dir, result)
        console.print(_summary(result))
        console.print(f"[bold]report:[/bold] {path}")
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything the demo started[/yellow]")
        return 130
    except RuntimeError as e:
        console.print(f"[red]demo failed:[/red] {e}")
        return 1
    finally:
        procs.stop()
        if not keep_up and not was_up:
            for name, outcome in stack.down(cfg):
                console.print(f"{name}: {outcome}")


# --------------------------------------------------------------------------- setup steps


def _world(cfg: Config, scale: str, console: Console) -> tuple[Path, dict]:
    from sim.generate import generate

    console.rule(f"2/7 simulated world ({scale})")
    wdir = cfg.data_dir / "sim" / f"{scale}-{cfg.sim.seed}"
    if (wdir / "ground_truth.npz").exists():
        console.print(f"reusing {wdir}")
        meta = json.loads((wdir / "world.json").read_text())
    else:
        meta = generate(cfg, scale, cfg.sim.seed, wdir, progress=lambda s, f: console.print(f"  {s} {f:4.0%}", end="\r"))
    console.print(f"{meta['users']} users, {meta['posts']} posts, {meta['impressions']} logged impressions")
    return wdir, meta


def _models(cfg: Config, wdir: Path, retrain: bool, console: Console) -> None:
    from models.store import ModelStore
    from models.train import train_all

    console.rule("3/7 models")
    store = ModelStore.from_config(cfg)
    stamp_file = cfg.data_dir / "models-world.txt"  # which world the current models were trained on
    same_world = stamp_file.exists() and stamp_file.read_text().strip() == str(wdir)
    if not retrain and same_world and all(store.current(m) for m in ("two_tower", "retrieval", "light", "heavy")):
        console.print("reusing the current models: " + ", ".join(f"{m} {store.current(m)}" for m in
                                                                 ("two_tower", "retrieval", "light", "heavy")))
        return
    t0 = time.perf_counter()
    last = [""]

    def progress(stage: str, frac: float) -> None:
        if stage != last[0]:
            console.print(f"  {stage}")
            last[0] = stage

    train_all(cfg, str(wdir), "all", store=store, progress=progress, tt_epochs=3, heavy_epochs=2, heavy_rows=200_000)
    stamp_file.write_text(str(wdir))
    console.print(f"trained and promoted in {time.perf_counter() - t0:.0f} s")


def _features(cfg: Config, wdir: Path, console: Console) -> None:
    from features.feast_repo import apply, export
    from lab.bench_serve import load_user_rows

    console.rule("4/7 Feast: apply, export the world's offline features, load them online")
    apply(cfg)
    counts = export(cfg, wdir)
    n = load_user_rows(cfg, lambda s, f: None)
    console.print(f"exported {counts}; {n} users' rows in the online store")


def _wait_healthy(address: str, procs: ProcessGroup, console: Console, timeout: float = 300.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch = grpc.insecure_channel(address)
    t0 = time.time()
    with console.status("waiting for the FeedService"):
        while time.time() - t0 < timeout:
            procs.check()
            try:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    console.print(f"FeedService serving on {address} after {time.time() - t0:.0f} s")
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"the FeedService did not become healthy in {timeout:.0f} s")


def _wait_jobs(cfg: Config, procs: ProcessGroup, console: Console, timeout: float = 240.0) -> None:
    """Until both jobs report progress (their JVMs are up and the pipelines run)."""
    from features.progress import read_progress

    t0 = time.time()
    with console.status("waiting for the PyFlink jobs"):
        while time.time() - t0 < timeout:
            procs.check()
            if read_progress(cfg, "features") and read_progress(cfg, "learner") and read_progress(cfg, "lake"):
                console.print(f"feature job, learner and lake job running after {time.time() - t0:.0f} s")
                return
            time.sleep(1.0)
    raise RuntimeError(f"the PyFlink jobs did not report progress in {timeout:.0f} s\n" + job_diagnostics(cfg, procs))


def job_diagnostics(cfg: Config, procs: ProcessGroup) -> str:
    """What a stuck job said: the tail of its console, the last warnings of its JVM log, and the
    Python stacks of an operator whose open did not return (jobs/startup_stacks.py)."""
    from runtime.procs import tail

    out = []
    for name in ("feature-job", "learner", "lake-job"):
        out.append(f"--- {name} console (last lines):\n{tail(procs.log_dir / (name + '.log'), 6)}")
    for log in sorted((cfg.data_dir / "flink").glob("log-*/*.log")):
        bad = [ln for ln in log.read_text(errors="replace").splitlines() if " ERROR " in ln or " WARN " in ln
               or "Exception" in ln]
        out.append(f"--- {log} ({len(bad)} warnings/errors; last):\n" + "\n".join(bad[-8:]))
    from jobs.startup_stacks import read_dumps

    out.append(read_dumps(cfg) or "--- no Python stack dump (no operator's open outlasted half the start-up timeout)")
    return "\n".join(out)


# --------------------------------------------------------------------------- the run


def _clients(cfg: Config, world: Any, users: int, minutes: float, address: str, procs: ProcessGroup,
             console: Console, shift: bool = True) -> dict[str, Any]:
    """Simulated clients in real time against the server, a trend shift at the midpoint (``shift``: the first
    phase; it then stays), freshness probes. ``world`` (a sim.world.World) carries over from phase to phase."""
    from features.change_streams import PostStatsCache
    from features.connection import redis_client
    from serving.client import GrpcFeedApi
    from serving.state import SERVING_CLOCK
    from sim.clients import Population, WallClock
    from sim.world import TrendShift

    raw = redis_client(cfg).hgetall(SERVING_CLOCK)
    offset = int(time.time() * 1000) - int(raw[b"wall0_ms"]) + int(raw[b"sim0_ms"]) - world.end_ms if raw else 0
    clock = WallClock(world.end_ms + offset)
    t0_ms, wall0_ms = clock.now_ms(), int(time.time() * 1000)
    duration_s = minutes * 60.0
    shift_topic = int(cfg.sim.trend_shifts[0].topic) if cfg.sim.trend_shifts else 3
    shift_at = t0_ms + int(duration_s * 500)
    if shift:  # the truth changes midway; nobody is told (it stays changed in later phases)
        world.trends.append(TrendShift(shift_topic, shift_at, 1.5))
    params = cfg.clients.model_copy(update={"session_gap_s": 60.0})
    pop = Population(world, params, users, seed=cfg.sim.seed, page_size=cfg.funnel.page_size,
                     repost_rate=cfg.sim.repost_rate, policy_flag_rate=cfg.sim.policy_flag_rate)
    api = GrpcFeedApi(address, cfg.serving.jwt_secret)
    timeline: list[dict[str, Any]] = []
    last = {"t": 0, "utility": 0.0, "examined": 0, "impressions": 0, "clicks": 0, "shift_util": 0.0, "shift_n": 0}
    shift_served = {"n": 0, "shift": 0}

    # per-minute utility on the shifted topic: wrap the API to see what was served
    real_get = api.get_feed

    def get_feed(user_id: int, feed_type: str = "home", cursor: str = "", limit: int = 20, now_ms=None):
        page = real_get(user_id, feed_type, cursor, limit, now_ms)
        for it in page.items:
            shift_served["n"] += 1
            shift_served["shift"] += int(world.post_topic[it.post_id] == shift_topic) if it.post_id < world.n_posts else 0
        return page

    api.get_feed = get_feed  # type: ignore[method-assign]

    def on_tick(elapsed_ms: int, st: Any) -> None:
        if elapsed_ms - last["t"] < 15_000:
            return
        procs.check()
        d_imp = st.impressions - last["impressions"]
        d_clk = st.actions["click"] - last["clicks"]
        d_ex = st.examined - last["examined"]
        timeline.append({"t_s": elapsed_ms / 1000.0, "impressions": d_imp, "ctr": d_clk / d_imp if d_imp else 0.0,
                         "utility_per_examined": (st.utility - last["utility"]) / d_ex if d_ex else 0.0,
                         "shift_topic_share": shift_served["shift"] / shift_served["n"] if shift_served["n"] else 0.0,
                         "sessions": st.sessions})
        shift_served["n"] = shift_served["shift"] = 0
        last.update(t=elapsed_ms, utility=st.utility, examined=st.examined, impressions=st.impressions,
                    clicks=st.actions["click"])
        console.print(f"  {elapsed_ms / 60000:4.1f} min  sessions={st.sessions} impressions={st.impressions} "
                      f"CTR={timeline[-1]['ctr']:.3f}")

    cache = PostStatsCache(cfg, capacity=world.n_posts + 100_000).start()
    probes: list[float] = []
    stop = threading.Event()

    def freshness() -> None:
        """A reader clicks an old post nobody else is shown; time until serving's post-stats cache has the click
        (event log -> feature job -> online store + change stream -> the serving replica's cache)."""
        from core.events import Engagement

        rng = np.random.default_rng(5)
        # a service's (admin) token: the reader was never served the post, and only served posts count for users
        probe_api = GrpcFeedApi(address, cfg.serving.jwt_secret, admin=True)
        while not stop.wait(10.0):
            pid = int(rng.integers(max(world.n_posts // 10, 1)))
            reader = int(rng.integers(world.n_users))
            try:
                before = cache.get(pid).get("clicks", 0)
                probe_api.submit_signals(reader, [Engagement(user_id=reader, post_id=pid, action="click",
                                                             ts=clock.now_ms())])
                t0 = time.monotonic()
                while time.monotonic() - t0 < 10 and cache.get(pid).get("clicks", 0) <= before:
                    time.sleep(0.02)
                probes.append(time.monotonic() - t0 if cache.get(pid).get("clicks", 0) > before else float("inf"))
            except Exception:  # noqa: BLE001 - a failed probe is reported as missing, never fatal
                probes.append(float("inf"))

    probe_thread = None
    t_wall = time.perf_counter()
    try:
        probe_thread = threading.Thread(target=freshness, daemon=True)
        probe_thread.start()
        stats = pop.run(api, clock, duration_s, on_tick=on_tick)
    finally:
        stop.set()
        if probe_thread is not None:
            probe_thread.join(timeout=15)
        cache.stop()
    api_stats = api.stats()
    api.close()
    return {"stats": stats, "timeline": timeline, "probes": probes, "api": api_stats, "wall_s": time.perf_counter() - t_wall,
            "shift": {"topic": shift_topic, "at_s": (shift_at - t0_ms) / 1000.0} if shift else None, "t0_ms": t0_ms, "wall0_ms": wall0_ms,
            "world": world}


# --------------------------------------------------------------------------- results


def _drain(cfg: Config, run: dict[str, Any], console: Console, timeout: float = 60.0) -> None:
    """Give the jobs up to ``timeout`` to catch up with the run's last events before reading their counters."""
    from features.progress import read_progress

    if not run["stats"].actions.get("click"):
        return
    t0 = time.time()
    with console.status("letting the jobs catch up"):
        while time.time() - t0 < timeout and not (read_progress(cfg, "learner").get("examples") or 0) > 0:
            time.sleep(1.0)


def _exposures_since(cfg: Config, t0_ms: int) -> list[Any]:
    from features.eventlog import open_configured_event_log, read_all
    from core.events import parse_event

    log = open_configured_event_log(cfg)
    out = []
    for line in read_all(log.reader(), idle_s=1.0, max_s=300):
        if '"exposure"' not in line:
            continue
        e = parse_event(line)
        if e.ts >= t0_ms:
            out.append(e)
    log.close()
    return out


def rerank_constraints(exposures: list[Any], page: int, max_run: int, min_oon: float, ad_every: int) -> dict[str, Any]:
    """Checks every served HOME page (from the exposure log) against the re-rank rules."""
    by_req: dict[str, list[Any]] = defaultdict(list)
    for e in exposures:
        if e.feed_type == "home":
            by_req[e.request_id].append(e)
    pages = runs_ok = oon_ok = ads_ok = 0
    full_pages = 0
    for items in by_req.values():
        items.sort(key=lambda e: e.position)
        for start in range(0, len(items), page):
            chunk = items[start: start + page]
            pages += 1
            authors = [e.author_id for e in chunk]
            run = best = 1
            for a, b in zip(authors, authors[1:]):
                run = run + 1 if a == b else 1
                best = max(best, run)
            runs_ok += int(best <= max_run)
            if len(chunk) == page:
                full_pages += 1
                oon = sum(e.source in ("out_of_network", "trending") for e in chunk)
                oon_ok += int(oon >= int(np.ceil(min_oon * page)))
                ads_ok += int(all((e.source == "ad") == (e.position % ad_every == 0) for e in chunk) if ad_every else True)
    return {"requests": len(by_req), "pages": pages, "full_pages": full_pages,
            "author_runs_ok": runs_ok / pages if pages else None,
            "out_of_network_ok": oon_ok / full_pages if full_pages else None,
            "ad_slots_ok": ads_ok / full_pages if full_pages else None}


def _collect(cfg: Config, run: dict[str, Any], meta: dict, seconds: float) -> dict[str, Any]:
    from features.progress import read_progress
    from lab.bench_serve import scrape_metrics, stage_quantiles
    from jobs.learner import read_decisions

    st = run["stats"]
    organic = sum(v for k, v in st.sources.items() if k != "ad")
    discovery = (st.sources.get("out_of_network", 0) + st.sources.get("trending", 0)) / organic if organic else 0.0
    # this run's: event time restarts at the world's end in every run, and Redis keeps earlier runs' decisions
    decisions = [d for d in read_decisions(cfg) if d.get("decision") != "wait" and d.get("at_ms", 0) >= run["t0_ms"]
                 and d.get("decided_at_wall_ms", 0) >= run["wall0_ms"]]
    learner = read_progress(cfg, "learner")
    features = read_progress(cfg, "features")
    try:
        stages = stage_quantiles({}, scrape_metrics([cfg.serving.metrics_port]))
    except OSError:
        stages = {}
    probes = np.array(run["probes"]) * 1000 if run["probes"] else np.array([np.inf])
    ok = probes[np.isfinite(probes)]
    exposures = _exposures_since(cfg, run["t0_ms"])
    rr = cfg.rerank
    return {
        "world": {k: meta[k] for k in ("scale", "users", "posts", "impressions")},
        "wall_seconds": round(seconds, 1), "client_seconds": round(run["wall_s"], 1),
        "clients": {"sessions": st.sessions, "impressions": st.impressions, "ctr": round(st.ctr, 4),
                    "actions": dict(st.actions), "published": st.published, "follows": st.follows, "errors": st.errors,
                    "utility": round(st.utility, 1), "utility_per_examined": round(st.utility / max(st.examined, 1), 4),
                    "sources": dict(st.sources), "discovery_share": round(discovery, 4)},
        "get_feed_client": run["api"],
        "timeline": run["timeline"], "trend_shift": run["shift"],
        "online_learning": {"decisions": decisions,
                            "counts": dict(Counter(d["decision"] for d in decisions)),
                            "progress": {k: learner.get(k) for k in ("examples", "steps", "promoted", "rejected",
                                                                     "rolled_back", "current")}},
        "feature_job": {k: features.get(k) for k in ("post_events", "user_events", "topic_events", "dedupe_duplicates",
                                                     "dedupe_invalid")},
        "freshness_ms": {"probes": int(probes.size), "missed": int((~np.isfinite(probes)).sum()),
                         "p50": round(float(np.percentile(ok, 50)), 1) if ok.size else None,
                         "p99": round(float(np.percentile(ok, 99)), 1) if ok.size else None},
        "stage_latency_ms": stages,
        "rerank_constraints": rerank_constraints(exposures, cfg.funnel.page_size, rr.max_consecutive_author,
                                                 rr.min_out_of_network, rr.ad_every),
        "exposures_logged": len(exposures),
        "event_log": _event_log_figures(cfg),
    }


def _event_log_figures(cfg: Config) -> dict[str, Any]:
    """The transport, and on Kafka what the broker itself records: messages in the topic and how far
    each Flink job's consumer group has committed (on its checkpoints)."""
    from features.eventlog_kafka import topic_offsets
    from jobs.sources import kafka_group

    uri = cfg.events.uri
    out: dict[str, Any] = {"transport": uri.split("://")[0], "uri": uri}
    if uri.startswith("kafka://"):
        out.update(topic_offsets(uri, [kafka_group("features"), kafka_group("learner")]))
    return out


def _summary(r: dict[str, Any]) -> str:
    c, ol, fr = r["clients"], r["online_learning"]["counts"], r["freshness_ms"]
    g = r["get_feed_client"]
    return (f"event log {r['event_log']['transport']}; "
            f"{c['sessions']} sessions, {c['impressions']} impressions, CTR {c['ctr']:.3f}, discovery share "
            f"{c['discovery_share']:.0%}; GetFeed p50 {g['p50_ms']} ms p99 {g['p99_ms']} ms; freshness p50 {fr['p50']} ms "
            f"p99 {fr['p99']} ms; learner decisions {ol or 'none'}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def write_report(out: Path, r: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    tl = r["timeline"]
    if tl:
        t = np.array([x["t_s"] for x in tl]) / 60
        fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
        axes[0].plot(t, [x["utility_per_examined"] for x in tl], "o-")
        axes[0].set_ylabel("true utility / examined item")
        axes[1].plot(t, [x["ctr"] for x in tl], "o-", color="tab:green")
        axes[1].set_ylabel("CTR")
        axes[2].plot(t, [x["shift_topic_share"] for x in tl], "o-", color="tab:red")
        axes[2].set_ylabel(f"share of topic {r['trend_shift']['topic']}")
        axes[2].set_xlabel("minutes")
        for ax in axes:
            ax.axvline(r["trend_shift"]["at_s"] / 60, color="k", ls="--", lw=0.8)
        axes[0].set_title("served quality over time (dashed: trend shift)")
        fig.tight_layout()
        fig.savefig(out / "utility_ctr_over_time.png", dpi=110)
        plt.close(fig)
        files.append("utility_ctr_over_time.png")
    decisions = [d for d in r["online_learning"]["decisions"] if "auc_candidate" in d or d["decision"] == "rollback"]
    if decisions:
        fig, axes = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
        colors = {"promote": "tab:green", "reject": "tab:red", "superseded": "tab:orange"}
        t0 = min(d["at_ms"] for d in decisions)
        tm = lambda ds: [(d["at_ms"] - t0) / 60000 for d in ds]  # noqa: E731
        judged = [d for d in decisions if "auc_candidate" in d]
        for ax, metric, bound, label in ((axes[0], "auc", "auc_floor", "holdout click AUC"),
                                         (axes[1], "logloss", "logloss_ceiling", "holdout click log loss")):
            for kind, col in colors.items():
                ds = [d for d in judged if d["decision"] == kind]
                ax.scatter(tm(ds), [d[f"{metric}_candidate"] for d in ds], c=col, label=f"candidate: {kind}", zorder=3)
            ax.plot(tm(judged), [d[f"{metric}_current"] for d in judged], "k.-", lw=0.8, label="current")
            ax.plot(tm(judged), [d[bound] for d in judged], "k--", lw=0.7,
                    label="floor (1% below current and the offline model)" if metric == "auc" else "ceiling")
            for d in decisions:
                if d["decision"] == "rollback":
                    ax.axvline((d["at_ms"] - t0) / 60000, color="tab:purple", lw=1, label="rollback")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7, loc="best")
        axes[1].set_xlabel("event-time minutes")
        axes[0].set_title("online learning: every decision's holdout metrics")
        fig.tight_layout()
        fig.savefig(out / "online_learning.png", dpi=110)
        plt.close(fig)
        files.append("online_learning.png")
    st = r["stage_latency_ms"]
    if st:
        names = [n for n in st if n not in ("refresh",)]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        x = np.arange(len(names))
        ax.bar(x - 0.2, [st[n].get("p50_ms", 0) for n in names], 0.4, label="p50")
        ax.bar(x + 0.2, [st[n].get("p99_ms", 0) for n in names], 0.4, label="p99")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ms")
        ax.legend()
        ax.set_title("GetFeed latency per funnel stage (server histograms)")
        fig.tight_layout()
        fig.savefig(out / "stage_latency.png", dpi=110)
        plt.close(fig)
        files.append("stage_latency.png")
    (out / "demo.json").write_text(json.dumps(r, indent=2, default=str))
    c, g, fr, rc = r["clients"], r["get_feed_client"], r["freshness_ms"], r["rerank_constraints"]
    ol, ev = r["online_learning"], r["event_log"]
    md = [
        "# feedrank demo", "",
        f"World: {r['world']['scale']} ({r['world']['users']} users, {r['world']['posts']} posts). Wall time "
        f"{r['wall_seconds']:.0f} s, of which simulated clients {r['client_seconds']:.0f} s (real time).", "",
        f"Event log: **{ev['transport']}** ({ev['uri']})" + (
            f": {ev['messages']} messages in {ev['partitions']} partitions; committed by the Flink jobs' consumer "
            + ", ".join(f"groups {k}: {v['committed']} (lag {v['lag']})" for k, v in ev["groups"].items())
            if ev["transport"] == "kafka" else "") + ".", "",
        "| figure | value |", "|---|---|",
        f"| sessions / impressions | {c['sessions']} / {c['impressions']} |",
        f"| CTR | {c['ctr']:.4f} |",
        f"| true utility per examined item | {c['utility_per_examined']} |",
        f"| discovery share (out-of-network + trending of organic items) | {c['discovery_share']:.1%} |",
        f"| posts published / follows during the run | {c['published']} / {c['follows']} |",
        f"| client errors | {c['errors']} |",
        f"| GetFeed over gRPC (client side) p50 / p99 | {g['p50_ms']} ms / {g['p99_ms']} ms ({g['get_feed_calls']} calls, "
        f"{g['degraded_responses']} degraded) |",
        f"| feature freshness (click -> serving cache) p50 / p99 | {fr['p50']} ms / {fr['p99']} ms ({fr['probes']} probes, "
        f"{fr['missed']} missed) |",
        f"| online learning decisions | {ol['counts'] or 'none'} |",
        f"| learner progress | {ol['progress']} |",
        f"| feature job | {r['feature_job']} |",
        f"| exposures logged this run | {r['exposures_logged']} |",
        f"| HOME pages with no author run > 3 | {_pct(rc['author_runs_ok'])} of {rc['pages']} |",
        f"| full HOME pages with >= 20% out-of-network | {_pct(rc['out_of_network_ok'])} of {rc['full_pages']} |",
        f"| full HOME pages with ads exactly at every 5th slot (ads are frequency-capped: once per user) | "
        f"{_pct(rc['ad_slots_ok'])} of {rc['full_pages']} |",
        "", f"Trend shift: topic {r['trend_shift']['topic']} gets +1.5 on its engagement logit (nobody is told) "
            f"at {r['trend_shift']['at_s'] / 60:.1f} min.", "",
        "## Per-stage latency (server)", "", "| stage | p50 ms | p99 ms |", "|---|---|---|",
    ]
    md += [f"| {n} | {v.get('p50_ms')} | {v.get('p99_ms')} |" for n, v in st.items()]
    judged = [d for d in ol["decisions"] if d["decision"] != "wait"]
    if judged:
        md += ["", "## Online learning decisions (holdout, default promotion rule)", "",
               "| event min | decision | click AUC candidate / current / floor | log loss candidate / current | reason |",
               "|---|---|---|---|---|"]
        t0 = min(d["at_ms"] for d in judged)
        md += [f"| {(d['at_ms'] - t0) / 60000:.1f} | {d['decision']} | {d.get('auc_candidate', '')} / "
               f"{d.get('auc_current', '')} / {d.get('auc_floor', '')} | {d.get('logloss_candidate', '')} / "
               f"{d.get('logloss_current', '')} | {d.get('reason', '')} |" for d in judged]
    if r.get("daily_cycle"):
        from lab.demo_cycle import report_lines

        md += ["", *report_lines(r["daily_cycle"])]
    md += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
