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
from typing import Any

from feedrank.config import Config


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


DEDUP_RETENTION_MS = 3_600_000  # an event_id is remembered this long
SUMMARY_EVERY = 5000  # events between two summaries (also emitted every 500 ms of processing time)


def _functions(cfg: Config, stall_open_once: str | None = None) -> tuple[type, type]:
    """The keyed process functions (imported lazily: pyflink is heavy).

    ``stall_open_once`` (a marker path) is the test hook for the supervisor: the first time,
    the tally operator's ``open`` never returns and ignores interrupts, as in PyFlink's
    thread-mode start-up hang."""
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import ValueStateDescriptor

    class FirstSeenFunction(KeyedProcessFunction):
        """Keyed by event_id: marks every repeat of an id as a duplicate.

        State expires through a processing-time timer, not StateTtlConfig: in thread mode
        on a standalone cluster, building a TTL config calls back into a py4j gateway the
        TaskManager does not have, and the job fails.
        """

        def open(self, ctx: Any) -> None:
            from jobs import startup_stacks

            startup_stacks.begin(cfg, "first-seen operator")
            self.seen = ctx.get_state(ValueStateDescriptor("seen", Types.BOOLEAN()))
            startup_stacks.end("first-seen operator")

        def process_element(self, value: Any, ctx: Any):
            eid, typ, err = value
            dup = bool(eid) and not err and self.seen.value() is not None
            if eid and not err and not dup:
                self.seen.update(True)
                ctx.timer_service().register_processing_time_timer(
                    ctx.timer_service().current_processing_time() + DEDUP_RETENTION_MS)
            yield typ, dup, err.split(":")[0] if err else ""

        def on_timer(self, timestamp: int, ctx: Any):
            self.seen.clear()
            return iter(())

    class TallyFunction(KeyedProcessFunction):
        """One key: running counts, emitted as a JSON summary every N events and when idle."""

        def open(self, ctx: Any) -> None:
            from jobs import startup_stacks

            startup_stacks.begin(cfg, "tally operator")
            if stall_open_once:
                from pathlib import Path

                marker = Path(stall_open_once)
                if not marker.exists():
                    marker.write_text("stalled once")
                    time.sleep(10**6)
            self.state = ctx.get_state(ValueStateDescriptor("tally", Types.STRING()))
            self.timer = ctx.get_state(ValueStateDescriptor("timer", Types.LONG()))
            startup_stacks.end("tally operator")

        def _tally(self) -> dict:
            raw = self.state.value()
            return json.loads(raw) if raw else {"events": 0, "duplicates": 0, "by_type": {}, "invalid_reasons": {}}

        def process_element(self, value: Any, ctx: Any):
            typ, dup, reason = value
            t = self._tally()
            t["events"] += 1
            t["duplicates"] += int(dup)
            t["by_type"][typ] = t["by_type"].get(typ, 0) + 1
            if reason:
                t["invalid_reasons"][reason] = t["invalid_reasons"].get(reason, 0) + 1
            raw = json.dumps(t)
            self.state.update(raw)
            if t["events"] % SUMMARY_EVERY == 0:
                yield raw
            if self.timer.value() is None:
                due = ctx.timer_service().current_processing_time() + 500
                ctx.timer_service().register_processing_time_timer(due)
                self.timer.update(due)

        def on_timer(self, timestamp: int, ctx: Any):
            self.timer.clear()
            raw = self.state.value()
            if raw:
                yield raw

    return FirstSeenFunction, TallyFunction


def build(env: Any, cfg: Config, stall_open_once: str | None = None) -> Any:
    """Event lines -> validate -> duplicate check keyed by event_id -> running summaries (JSON)."""
    from pyflink.common import Types

    from jobs.sources import event_lines

    first_seen, tally = _functions(cfg, stall_open_once)
    checked = (
        event_lines(env, cfg, "events")
        .map(validate_line, output_type=Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING()]))
        .key_by(lambda r: r[0] or r[2], key_type=Types.STRING())
        .process(first_seen(), output_type=Types.TUPLE([Types.STRING(), Types.BOOLEAN(), Types.STRING()]))
    )
    return checked.key_by(lambda r: 0, key_type=Types.INT()).process(tally(), output_type=Types.STRING())


def run_embedded(cfg: Config, expect: int | None = None, idle_s: float = 10.0, max_s: float = 600.0,
                 on_progress: Any = None) -> dict:
    """Run on a local MiniCluster until ``expect`` events were audited, or ``idle_s`` without progress.

    Returns the job's own counts: events, by type, invalid reasons, duplicates, throughput.
    """
    import threading

    from infra.flink import stream_env

    env = stream_env(cfg)
    stream = build(env, cfg)
    t0 = time.monotonic()
    summary: dict = {"events": 0, "duplicates": 0, "by_type": {}, "invalid_reasons": {}}
    first: float | None = None
    last = time.monotonic()
    closed_by_watchdog = threading.Event()
    with stream.execute_and_collect("feedrank-audit") as it:
        done = threading.Event()

        def watchdog() -> None:  # the collect iterator blocks; close it when the stream goes idle
            while not done.wait(0.5):
                if time.monotonic() - last > idle_s or time.monotonic() - t0 > max_s:
                    closed_by_watchdog.set()
                    it.close()
                    return

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            for raw in it:
                s = json.loads(raw)
                if s["events"] > summary["events"]:
                    last = time.monotonic()
                    first = first or last
                    summary = s
                    if on_progress:
                        on_progress(s["events"])
                if expect is not None and s["events"] >= expect:
                    break
        except Exception:  # noqa: BLE001
            if not closed_by_watchdog.is_set():
                raise
        finally:
            done.set()
    summary["unique_ids"] = summary["events"] - summary["duplicates"] - summary["by_type"].get("invalid", 0)
    summary["seconds_to_first"] = round((first or t0) - t0, 2)
    summary["seconds"] = round(last - t0, 2)
    summary["events_per_s_incl_startup"] = round(summary["events"] / (last - t0), 1) if last > t0 else None
    return summary


def main(argv: list[str]) -> None:
    """Entry point for `flink run -py jobs/audit.py`: prints one line per event."""
    from infra.flink import job_config, stream_env

    cfg = job_config(argv)
    env = stream_env(cfg)
    stall = argv[argv.index("--stall-open-once") + 1] if "--stall-open-once" in argv else None
    build(env, cfg, stall).print()
    env.execute("feedrank-audit")


if __name__ == "__main__":
    main(sys.argv[1:])
