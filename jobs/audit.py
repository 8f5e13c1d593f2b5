"""Event-log audit job (PyFlink, thread mode): validate every line, report by type.

The smallest real job over the event log, and the check that the log is healthy:
every event read once, malformed ones counted with their reason. Run embedded with
``feedrank jobs run audit`` or on the standalone cluster with
``flink run -py jobs/audit.py`` (prints to the taskmanager's stdout there).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import Any

from feedrank.config import Config, get_config


def validate_line(line: str) -> tuple[str, str, str]:
    """(event_id, type, error) for one JSON line; error is '' for a valid event."""
    from features.events import InvalidEvent, parse_event

    try:
        ev = parse_event(line)
        return ev.event_id, ev.type, ""  # type: ignore[attr-defined]
    except InvalidEvent as e:
        try:
            eid = str(json.loads(line).get("event_id", ""))
        except Exception:  # noqa: BLE001 - the line is not even JSON
            eid = ""
        return eid, "invalid", e.reason


def build(env: Any, cfg: Config) -> Any:
    """The job graph: event lines -> (event_id, type, error)."""
    from pyflink.common import Types

    from jobs.sources import event_lines

    return event_lines(env, cfg, "events").map(
        validate_line, output_type=Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING()])
    )


def run_embedded(cfg: Config, expect: int | None = None, idle_s: float = 10.0, max_s: float = 600.0,
                 on_progress: Any = None) -> dict:
    """Run on a local MiniCluster; stop after ``expect`` events or ``idle_s`` without new ones.

    Returns counts by type, invalid reasons, duplicates seen and throughput.
    """
    import threading

    from infra.flink import stream_env

    env = stream_env(cfg)
    stream = build(env, cfg)
    counts: Counter = Counter()
    reasons: Counter = Counter()
    ids: set[str] = set()
    dups = 0
    t0 = time.monotonic()
    first = None
    last = time.monotonic()
    with stream.execute_and_collect("feedrank-audit") as it:
        # the collect iterator blocks; a watchdog closes it when the stream goes idle
        done = threading.Event()

        def watchdog() -> None:
            while not done.wait(0.5):
                if time.monotonic() - last > idle_s or time.monotonic() - t0 > max_s:
                    it.close()
                    return

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            for eid, typ, err in it:
                last = time.monotonic()
                first = first or last
                counts[typ] += 1
                if err:
                    reasons[err.split(":")[0]] += 1
                elif eid in ids:
                    dups += 1
                else:
                    ids.add(eid)
                n = sum(counts.values())
                if on_progress and n % 5000 == 0:
                    on_progress(n)
                if expect is not None and n >= expect:
                    break
        except Exception:  # noqa: BLE001 - closing the iterator from the watchdog ends the loop
            if not (time.monotonic() - last > idle_s or time.monotonic() - t0 > max_s):
                raise
        finally:
            done.set()
    n = sum(counts.values())
    span = (last - first) if first else 0.0
    return {
        "events": n, "by_type": dict(counts), "invalid_reasons": dict(reasons), "duplicates": dups,
        "unique_ids": len(ids), "seconds_to_first": round((first or t0) - t0, 2),
        "events_per_s": round(n / span, 1) if span > 0 else None,
    }


def main(argv: list[str]) -> None:
    """Entry point for `flink run -py jobs/audit.py`: prints one line per event."""
    from infra.flink import stream_env

    cfg = get_config()
    env = stream_env(cfg)
    build(env, cfg).print()
    env.execute("feedrank-audit")


if __name__ == "__main__":
    main(sys.argv[1:])
