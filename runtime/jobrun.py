"""Running a streaming job (the feature job, the online learner) embedded, as `feedrank jobs run`
does: on a local MiniCluster, resuming from its newest retained checkpoint, with its progress
watched and a stuck start-up (operators that never finish opening) restarted in a fresh JVM."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import psutil

from core.config import Config
from core.services import ServiceError


class JobRunError(RuntimeError):
    """The job could not start, failed, or stopped by itself."""


def run_streaming_job(cfg: Config, job: str, seconds: float, resume: bool = True,
                      say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ``features``, ``learner`` or ``lake`` job on a local MiniCluster until ``seconds`` pass (0: until
    Ctrl-C) and return its progress; ``say`` gets the status lines. Raises JobRunError when the job
    cannot start, fails, or ends by itself (a streaming job never should)."""
    from features.progress import read_progress
    from jobs import flinkenv

    # jobs/feature_job.py, not jobs/features.py: `flink run -py jobs/<job>.py` puts jobs/ first
    # on sys.path, where a features.py would shadow the features package
    mod = __import__(f"jobs.{'feature_job' if job == 'features' else job}", fromlist=["run_embedded"])
    # each job's gateway JVM logs to its own directory: two jobs never write one file
    log_dir = cfg.data_dir / "flink" / f"log-{job}"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLINK_LOG_DIR", str(log_dir))
    opened = ("post_opened", "user_opened", "topic_opened") if job == "features" else ("opened",)
    before = read_progress(cfg, job)
    restore = flinkenv.latest_checkpoint(cfg, job) if resume else None
    say(f"{job} job: resuming from checkpoint {restore}" if restore else
                  f"{job} job: starting from the beginning of {cfg.events.uri} (no retained checkpoint"
                  f"{'' if resume else ' used: --fresh'})")
    try:
        client = mod.run_embedded(cfg, resume=resume)
    except (ServiceError, RuntimeError) as e:
        raise JobRunError(str(e)) from None
    say(f"{job} job submitted to a local MiniCluster (JVM log in {os.environ['FLINK_LOG_DIR']}); Ctrl-C stops it")
    keys = {"features": ("post_events", "user_events", "topic_events", "dedupe_duplicates", "dedupe_invalid"),
            "lake": ("exposures", "engagements", "features_served", "shadow_scores", "posts", "follows", "feedback",
                     "invalid")}.get(
        job, ("examples", "steps", "promoted", "rejected", "rolled_back", "current"))
    t0 = time.monotonic()
    failed: str | None = None
    started = False
    warming_since: dict[str, float] = {}  # operator -> when it began a warm-up (first element) not yet finished
    try:
        while not seconds or time.monotonic() - t0 < seconds:
            time.sleep(2.0)
            p = read_progress(cfg, job)
            if not started:
                started = all(p.get(k, 0) > before.get(k, 0) for k in opened)
                if not started and time.monotonic() - t0 > cfg.flink.startup_timeout_s:
                    restart_stuck_job(cfg, job, say, opened, p, before)
            for view in (k[: -len("_opened")] for k in opened):
                if p.get(f"{view}_warming", 0) > p.get(f"{view}_warmed", 0):
                    since = warming_since.setdefault(view, time.monotonic())
                    if time.monotonic() - since > cfg.flink.startup_timeout_s:  # stuck at its first element
                        restart_stuck_job(cfg, job, say, (f"{view}_warmed",), p, {f"{view}_warmed": p.get(f"{view}_warmed", 0)})
                else:
                    warming_since.pop(view, None)
            try:
                status = str(client.get_job_status().result()).rsplit(".", 1)[-1]
            except Exception as e:  # noqa: BLE001 - the MiniCluster is gone: say so rather than poll forever
                failed = f"{job} job status unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                break
            if status in ("FAILED", "CANCELED", "FINISHED"):
                failed = f"{job} job is {status}: {job_failure(client)}"
                break
            p = read_progress(cfg, job)
            say(f"  [{status}] " + "  ".join(
                f"{k}={p.get(k, 0):g}" if isinstance(p.get(k, 0), float) else f"{k}={p.get(k)}" for k in keys))
    except KeyboardInterrupt:
        pass
    finally:
        if failed is None:
            client.cancel().result()
    if failed:
        raise JobRunError(failed)
    return read_progress(cfg, job)


#: not FEEDRANK_*: the configuration rejects unknown FEEDRANK_ variables
START_ATTEMPT_ENV = "_FEEDRANK_JOB_START_ATTEMPT"


def restart_stuck_job(cfg: Config, job: str, say: Callable[[str], None], opened: tuple[str, ...], progress: dict,
                      before: dict) -> None:
    """Start again in a fresh JVM when the job's Python operators never finished opening.

    Measured: now and then (in CI, and in a long test session) PyFlink's thread-mode operators
    stayed INITIALIZING forever, their Python ``open`` never returning while the source ran; a
    new JVM started normally. The cause found is fixed (``core.embedded_sys_path``); this
    stays for any other start-up deadlock. Cancelling the stuck job would itself wait 180 s in the interpreter's
    finalizer, so the JVM is killed and this command re-executes itself (at most 3 attempts)."""
    from jobs.startup_stacks import read_dumps

    attempt = int(os.environ.get(START_ATTEMPT_ENV, "1"))
    missing = [k for k in opened if progress.get(k, 0) <= before.get(k, 0)]
    dumps = read_dumps(cfg, since=psutil.Process().create_time())
    say(dumps or "no Python stack dump: the operators never reached their own open")
    if attempt >= 3:
        raise JobRunError(f"{job} job: operators did not get ready ({', '.join(missing)}) in 3 attempts; see the JVM log in "
              f"{os.environ.get('FLINK_LOG_DIR')}")
    say(f"[yellow]{job} job: operators did not get ready ({', '.join(missing)}) in time: restarting it in a "
                  f"fresh JVM (attempt {attempt + 1} of 3)[/yellow]")
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    os.environ[START_ATTEMPT_ENV] = str(attempt + 1)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def job_failure(client) -> str:
    """The root cause of a job that ended by itself (a streaming job should never end)."""
    try:
        client.get_job_execution_result().result()
    except Exception as e:  # noqa: BLE001 - Py4J wraps the Java exception; its message is what people need
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.lstrip().startswith("at ")]
        return " | ".join(lines[-6:])
    return "it finished without an error"
