"""Event-log audit job (PyFlink, thread mode): validate every line, report by type.

The smallest real job over the event log, and the check that the log is healthy:
every event read once, malformed ones counted with their reason. Run embedded with
``feedrank jobs run audit`` or on the standalone cluster with
``flink run -py jobs/audit.py`` (prints to the taskmanager's stdout there).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from core.config import Config
from core.units import HOUR_MS


def validate_line(line: str) -> tuple[str, str, str]:
    """(event_id, type, error) for one JSON line; error is '' for a valid event."""
    from core.events import InvalidEvent, parse_event

    try:
        ev = parse_event(line)
        return ev.event_id, ev.type, ""  # type: ignore[attr-defined]
    except InvalidEvent as e:
        try:
            eid = str(json.loads(line).get("event_id", ""))
        except Exception:  # noqa: BLE001 - the line is not even JSON
            eid = ""
        return eid, "invalid", e.reason


DEDUP_RETENTION_MS = HOUR_MS  # an event_id is remembered this long
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
        event_lines(env, cfg, "events", "audit")
        .map(validate_line, output_type=Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING()]))
        .key_by(lambda r: r[0] or r[2], key_type=Types.STRING())
        .process(first_seen(), output_type=Types.TUPLE([Types.STRING(), Types.BOOLEAN(), Types.STRING()]))
    )
    return checked.key_by(lambda r: 0, key_type=Types.INT()).process(tally(), output_type=Types.STRING())


def run_embedded(cfg: Config, expect: int | None = None, idle_s: float = 10.0, max_s: float = 600.0,
                 on_progress: Any = None, startup_s: float | None = None) -> dict:
    """Run on a local MiniCluster until ``expect`` events were audited, or ``idle_s`` without progress.

    ``idle_s`` (at least a checkpoint interval + 1 s) counts from the job's latest output, never from its
    submission: a MiniCluster and its Python operators took more than 10 s to start on a busy machine, and an audit of a 70K-event log
    reported 0 events. Until the first output the limit is ``startup_s`` (``flink.startup_timeout_s``);
    a job with no output by then raises ServiceError saying whether its operators ran and read nothing
    (an empty log) or did not start, as the MiniCluster's REST API shows them (the job itself is
    RUNNING within a second, long before its operators are): 0 events is never returned as a result.

    Returns the job's own counts: events, by type, invalid reasons, duplicates, throughput, and why
    it stopped (``expect``, ``idle``, ``max_s``, or ``ended``: the job ended by itself).
    """
    import threading

    from pyflink.datastream.data_stream import CloseableIterator

    from jobs.flinkenv import job_failure, job_state, stream_env
    from core.services import ServiceError, free_port
    from jobs.startup_stacks import read_dumps

    startup_s = cfg.flink.startup_timeout_s if startup_s is None else startup_s
    # the collect sink of a checkpointing job hands results over as checkpoints complete, so outputs can
    # be a checkpoint interval apart while events flow (a fresh-clone run: --idle 2 stopped at 5,000 of 12,345)
    idle_s = max(idle_s, cfg.flink.checkpoint_interval_ms / 1000 + 1.0)
    # the MiniCluster's REST API on a port of our own: the operators' states, read like the cluster's
    local = cfg.model_copy(update={"flink": cfg.flink.model_copy(update={"rest_port": free_port()})})
    env = stream_env(cfg, {"rest.address": "localhost", "rest.bind-address": "localhost",
                           "rest.bind-port": str(local.flink.rest_port)})
    stream = build(env, cfg)
    # collectAsync + execute_async: what execute_and_collect does, and the job's id for the REST API
    j_iter = stream._j_data_stream.collectAsync()
    since = time.time()
    t0 = time.monotonic()
    job_id = str(env.execute_async("feedrank-audit").get_job_id())
    summary: dict = {"events": 0, "duplicates": 0, "by_type": {}, "invalid_reasons": {}}
    first: float | None = None
    last = t0
    stopped: list[str] = []  # set by the watchdog: why it closed the iterator
    not_started = ""  # set by the watchdog: why the job produced nothing

    def start_failure() -> str:
        """'' while the job may still start; else why it produced nothing (read before close() cancels it)."""
        state, vertices = job_state(local, job_id)
        if state in ("FAILED", "FAILING", "RESTARTING") or "FAILED" in vertices.values():
            return f"the audit job is {state}: {job_failure(local, job_id)}"
        if time.monotonic() - t0 <= startup_s:
            return ""
        if state == "RUNNING" and vertices and all(v == "RUNNING" for v in vertices.values()):
            return f"no events in {cfg.events.uri} within {startup_s:.0f} s: the audit job ran and read nothing"
        stuck = ", ".join(f"{k} {v}" for k, v in vertices.items() if v != "RUNNING") or f"job {state}"
        dumps = f"Python stacks in {cfg.data_dir / 'flink'}/python-stacks-*.txt" if read_dumps(cfg, since=since) else \
            f"JVM log in {os.environ.get('FLINK_LOG_DIR')}"
        return f"the audit job did not start within {startup_s:.0f} s ({stuck}); {dumps}"

    with CloseableIterator(j_iter, stream.get_type()) as it:
        done = threading.Event()

        def watchdog() -> None:  # the collect iterator blocks; close it when the stream goes idle
            nonlocal not_started
            while not done.wait(0.5):
                now = time.monotonic()
                if first is None and (not_started := start_failure()):
                    stopped.append("startup")
                elif first is not None and now - last > idle_s:
                    stopped.append("idle")
                elif now - t0 > max_s:
                    stopped.append("max_s")
                if stopped:
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
                    stopped.append("expect")
                    break
        except Exception as e:  # noqa: BLE001 - Py4J wraps the job's failure; one line of it is the message
            if not stopped:
                lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.lstrip().startswith("at ")]
                raise ServiceError(f"audit job failed: {' | '.join(lines[-3:]) or type(e).__name__}") from e
        finally:
            done.set()
    if first is None:
        raise ServiceError(not_started or f"the audit job ended without output ({', '.join(stopped) or 'by itself'})")
    summary["stopped"] = stopped[0] if stopped else "ended"  # ended: the job stopped by itself (cancelled)
    summary["unique_ids"] = summary["events"] - summary["duplicates"] - summary["by_type"].get("invalid", 0)
    summary["seconds_to_first"] = round(first - t0, 2)
    summary["seconds"] = round(last - t0, 2)
    summary["events_per_s_incl_startup"] = round(summary["events"] / (last - t0), 1) if last > t0 else None
    return summary


def main(argv: list[str]) -> None:
    """Entry point for `flink run -py jobs/audit.py`: prints its running summaries (JSON lines) to the
    taskmanager's stdout (``*taskexecutor*.out``, or REST ``/taskmanagers/<id>/stdout``)."""
    from jobs.flinkenv import job_config, stream_env

    cfg = job_config(argv)
    env = stream_env(cfg)
    stall = argv[argv.index("--stall-open-once") + 1] if "--stall-open-once" in argv else None
    build(env, cfg, stall).print()
    env.execute("feedrank-audit")


if __name__ == "__main__":
    main(sys.argv[1:])
