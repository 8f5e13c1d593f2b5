"""The demo's compressed daily cycle, on what the demo's FeedService logged: the lake job's partitions ->
batch features -> training set -> retrain the heavy ranker -> shadow-score it on a second, shorter client
phase -> promote or reject (``runtime.daily`` and ``models.shadow``, the same code as ``feedrank batch daily``
and ``feedrank models shadow status``; only the shadow window is shortened to the phase)."""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console

from core.config import Config


def sim_now_ms(cfg: Config) -> int:
    """The serving clock (simulated time running at wall speed from the world's end), as the demo's clients see it."""
    from features.connection import redis_client
    from serving.state import SERVING_CLOCK

    raw = redis_client(cfg).hgetall(SERVING_CLOCK)
    now = int(time.time() * 1000)
    return now - int(raw[b"wall0_ms"]) + int(raw[b"sim0_ms"]) if raw else now


def wait_lake(cfg: Config, table: str, since_ms: int, console: Console, timeout_s: float = 180.0,
              at_least: int = 1) -> int:
    """Rows of ``table`` with ts >= ``since_ms`` once the count is at least ``at_least`` and stopped growing
    (the lake job commits with its checkpoints)."""
    import pyarrow.compute as pc

    from features import lake

    dates = sorted({lake.partition(since_ms)[0], lake.partition(sim_now_ms(cfg))[0]})
    t0, last = time.monotonic(), -1
    with console.status(f"waiting for the lake job to commit {table}"):
        while time.monotonic() - t0 < timeout_s:
            n = lake.read_table(cfg, table, dates, columns=["ts"], where=lambda t: pc.greater_equal(t["ts"], since_ms)).num_rows
            if n >= at_least and n == last:
                return n
            last = n
            time.sleep(max(3.0, cfg.flink.checkpoint_interval_ms / 1000 + 1))
    raise RuntimeError(f"the lake job committed {last} {table} rows of this run in {timeout_s:.0f} s")


def run_cycle(cfg: Config, t0_ms: int, phase_minutes: float, clients: Callable[[float], dict[str, Any]],
              console: Console) -> dict[str, Any]:
    """``clients(minutes)`` runs the simulated users against the FeedService (the demo's client phase)."""
    from features import lake
    from lab.bench_serve import wait_shadow
    from models import shadow
    from models.store import ModelStore
    from runtime.daily import daily_cycle

    t_start = time.monotonic()
    exposures = wait_lake(cfg, "exposures", t0_ms, console)
    now = sim_now_ms(cfg)
    dates = sorted({lake.partition(t0_ms)[0], lake.partition(now)[0]})
    console.print(f"the lake holds this run's {exposures} exposures ({', '.join(dates)})")
    report = daily_cycle(cfg, dates[-1], len(dates), say=console.print, now_ms=now)
    wait_shadow([cfg.serving.metrics_port], True)
    console.print(f"shadow candidate {report['candidate']}: {phase_minutes:g} more minutes of clients")
    phase_t0 = sim_now_ms(cfg)
    phase = clients(phase_minutes)
    scored = wait_lake(cfg, "shadow_scores", phase_t0, console)
    wait_lake(cfg, "engagements", phase_t0, console)
    # the compressed window: the phase itself, and the minimum evidence a few minutes can give
    scfg = cfg.model_copy(update={"shadow": cfg.shadow.model_copy(update={
        "window_s": max(1, int(phase_minutes * 60) - 5), "min_pages": min(cfg.shadow.min_pages, 20),
        "min_positives": min(cfg.shadow.min_positives, 5)})})
    status = shadow.status(scfg, ModelStore.from_config(cfg), decide=True, now_ms=sim_now_ms(cfg))
    if shadow.active(cfg) is not None:  # undecided (too little evidence): the demo leaves nothing running
        shadow.stop(cfg)
    report["shadow"] = {k: status.get(k) for k in ("decision", "reasons", "pages", "heads", "ndcg", "candidate")}
    report["shadow"]["pages_in_lake"] = scored
    report["shadow"]["window"] = {"window_s": scfg.shadow.window_s, "min_pages": scfg.shadow.min_pages,
                                  "min_positives": scfg.shadow.min_positives}
    report["phase_clients"] = {"sessions": phase["stats"].sessions, "impressions": phase["stats"].impressions}
    report["lake_exposures"] = exposures
    report["wall_seconds"] = round(time.monotonic() - t_start, 1)
    return report


def report_lines(c: dict[str, Any]) -> list[str]:
    """The report's section on the cycle."""
    steps = c["steps"]
    sh = c["shadow"]
    out = ["## Compressed daily cycle (the lake -> batch features -> training set -> retrain -> shadow -> decide)", "",
           f"{c['lake_exposures']} exposures of this run in the lake; the cycle took {c['wall_seconds']:.0f} s wall.", "",
           "| step | seconds | result |", "|---|---|---|"]
    for name, s in steps.items():
        r = s["result"]
        brief = r if not isinstance(r, dict) else {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        out.append(f"| {name} | {s['seconds']} | {str(brief)[:160]} |")
    out += ["", f"Shadow candidate `{c['candidate']}` scored {sh['pages']} served pages ({sh['pages_in_lake']} in the lake) "
            f"during {c['phase_clients']['sessions']} more sessions; window {sh['window']}.", "",
            f"**Decision: {sh['decision']}** — {'; '.join(sh['reasons'] or []) or 'no reasons recorded'}", ""]
    return out
