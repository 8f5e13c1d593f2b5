"""`feedrank demo`: the whole system as far as it is built, on the embedded stack.

Today: start the stack -> generate the world -> simulated users and creators use the V0
feed (every exposure, signal, post and follow goes to the event log) -> a PyFlink job
reads the log back and audits it -> a report with figures measured in this run.
Ctrl-C stops everything the demo started.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console

from feedrank.config import PROJECT_ROOT, Config


def run_demo(cfg: Config, scale: str, users: int, minutes: float, keep_up: bool, console: Console) -> int:
    from features.eventlog import open_configured_event_log
    from infra import runtime
    from jobs.audit import run_embedded
    from serving.chronological import ChronologicalFeed
    from sim.clients import Population, SimClock
    from sim.generate import generate
    from sim.world import World

    t_start = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    report_dir = PROJECT_ROOT / "reports" / stamp
    report_dir.mkdir(parents=True, exist_ok=True)
    was_up = {s["name"] for s in runtime.status(cfg) if s["healthy"] and s.get("pid")}
    try:
        console.rule("1/4 embedded stack")
        for name, outcome in runtime.up(cfg):
            console.print(f"[green]✓[/green] {name}: {outcome}")

        console.rule(f"2/4 simulated world ({scale})")
        wdir = cfg.data_dir / "sim" / f"{scale}-{cfg.sim.seed}"
        if (wdir / "ground_truth.npz").exists():
            console.print(f"reusing {wdir}")
            meta = json.loads((wdir / "world.json").read_text())
        else:
            meta = generate(cfg, scale, cfg.sim.seed, wdir,
                            progress=lambda s, f: console.print(f"  {s} {f:4.0%}", end="\r"))
        console.print(f"{meta['users']} users, {meta['posts']} posts, {meta['impressions']} logged impressions")

        console.rule(f"3/4 {users} simulated users, {minutes:.0f} simulated minutes, V0 feed -> event log")
        world = World.load(wdir)
        log = open_configured_event_log(cfg)
        api = ChronologicalFeed(world, log)
        pop = Population(world, cfg.clients, users, seed=cfg.sim.seed, page_size=cfg.funnel.page_size,
                         repost_rate=cfg.sim.repost_rate, policy_flag_rate=cfg.sim.policy_flag_rate)
        written_before = _count_log(log)
        t0 = time.perf_counter()
        stats = pop.run(api, SimClock(world.end_ms), minutes * 60.0,
                        on_tick=lambda el, st: console.print(f"  {el / 60000:5.1f} min  sessions={st.sessions} "
                                                             f"impressions={st.impressions}", end="\r"))
        log.close()
        written = _count_log(log) - written_before
        client_s = time.perf_counter() - t0
        console.print(f"\n{stats.sessions} sessions, {stats.impressions} impressions, CTR {stats.ctr:.3f}, "
                      f"{stats.published} posts published, {written} events written in {client_s:.1f}s")

        console.rule("4/4 PyFlink audit job over the event log")
        total = written_before + written
        audit = run_embedded(cfg, expect=total, idle_s=15.0,
                             on_progress=lambda n: console.print(f"  read {n}/{total}", end="\r"))
        console.print(f"\nread {audit['events']} events ({audit['unique_ids']} unique), "
                      f"{audit['duplicates']} duplicates, invalid {audit['by_type'].get('invalid', 0)}")
        ok = audit["events"] == total and audit["duplicates"] == 0
        path = _report(report_dir, world, stats, audit, meta, written, total, time.perf_counter() - t_start)
        console.print(f"[bold]report:[/bold] {path}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    finally:
        if not keep_up and not was_up:
            for name, outcome in runtime.down(cfg):
                console.print(f"{name}: {outcome}")


def _count_log(log) -> int:
    from features.eventlog import read_all

    return len(read_all(log.reader(), idle_s=0.3))


def _report(out: Path, world, stats, audit: dict, meta: dict, written: int, total: int, seconds: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = np.array(sorted(p for p in stats.impressions_by_pos if p <= 40))
    ctr = np.array([stats.clicks_by_pos[p] / stats.impressions_by_pos[p] for p in pos])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(pos, ctr, "o-", label="measured CTR (this run)")
    if ctr.size and ctr[0] > 0:
        ax.plot(pos, ctr[0] * world.examination_prob(pos), "--", label="CTR@1 x true examination curve")
    ax.set_xlabel("position")
    ax.set_ylabel("click-through rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ctr_by_position.png", dpi=120)
    plt.close(fig)
    result = {"world": {k: meta[k] for k in ("scale", "users", "posts", "impressions")},
              "clients": {"sessions": stats.sessions, "impressions": stats.impressions, "ctr": stats.ctr,
                          "actions": dict(stats.actions), "published": stats.published, "follows": stats.follows,
                          "errors": stats.errors},
              "event_log": {"written_this_run": written, "total": total}, "audit_job": audit,
              "seconds": round(seconds, 1)}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    md = [
        "# feedrank demo", "",
        f"World: {meta['scale']} ({meta['users']} users, {meta['posts']} posts). Wall time {seconds:.0f} s.", "",
        "| figure | value |", "|---|---|",
        f"| sessions | {stats.sessions} |", f"| impressions served (V0 feed) | {stats.impressions} |",
        f"| CTR | {stats.ctr:.4f} |", f"| posts published during the run | {stats.published} |",
        f"| events written this run | {written} |", f"| events read by the PyFlink audit job | {audit['events']} |",
        f"| duplicates read | {audit['duplicates']} |", f"| invalid events | {audit['by_type'].get('invalid', 0)} |",
        f"| audit job throughput incl. JVM start-up (events/s) | {audit['events_per_s_incl_startup']} |", "",
        "![CTR by position](ctr_by_position.png)", "",
        "Not yet in the demo: the learned funnel, Feast features, online learning (later issues).",
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"
