"""Flink's standalone cluster: conf, logs and pid files under ``var/flink`` (nothing is written
into site-packages), job submission with resume from checkpoints, and supervision of jobs and
taskmanagers. The environment a job itself runs in is :mod:`jobs.flinkenv`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from core.config import PROJECT_ROOT, Config
from core.services import ServiceError, port_open
from jobs.flinkenv import base_configuration, flink_home, job_failure, job_state, python_path, require_java, rest


# ------------------------------------------------------------------ standalone cluster


def cluster_dirs(cfg: Config) -> dict[str, Path]:
    root = cfg.data_dir / "flink"
    return {"conf": root / "conf", "log": root / "log", "pid": root / "run", "tmp": root / "tmp"}


def cluster_variables(cfg: Config) -> dict[str, str]:
    """What every script and client of our cluster needs in its environment: the one source for
    ``cluster_environ`` (our own calls) and ``feedrank flink env`` (a user's shell, for a plain
    ``flink run``). Without them the client logs into site-packages (pyflink/log), reads pyflink's
    own conf, runs the job's ``main`` with the first ``python`` on PATH (``No module named
    'feedrank'``) and there is no ``flink`` on PATH at all."""
    d = cluster_dirs(cfg)
    bin_dir = str(flink_home() / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    return {
        "FLINK_HOME": str(flink_home()),
        "FLINK_CONF_DIR": str(d["conf"]),
        "FLINK_LOG_DIR": str(d["log"]),
        "FLINK_PID_DIR": str(d["pid"]),
        "PYTHONPATH": python_path(),
        "PYFLINK_CLIENT_EXECUTABLE": sys.executable,
        "PATH": os.pathsep.join([bin_dir, *path]),
    }


def cluster_environ(cfg: Config) -> dict[str, str]:
    """This process's environment plus ``cluster_variables``: for the scripts we run ourselves."""
    return {**os.environ, **cluster_variables(cfg)}


def shell_exports(cfg: Config) -> str:
    """``cluster_variables`` as POSIX ``export`` lines, for ``eval "$(feedrank flink env)"``."""
    import shlex

    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in cluster_variables(cfg).items())


def _yaml_value(v: str) -> str:
    return json.dumps(v)  # JSON strings are valid YAML scalars


def write_cluster_conf(cfg: Config) -> Path:
    d = cluster_dirs(cfg)
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    src = flink_home() / "conf"
    for f in src.iterdir():
        if f.name != "config.yaml":
            shutil.copy2(f, d["conf"] / f.name)
    # one JVM per taskmanager: pemja (thread mode) loads libpython once per JVM and cannot load
    # it again for a second job's classloader on Java 17 (NoSuchFieldException:
    # loadedLibraryNames), so each concurrently running Python job needs its own taskmanager
    (d["conf"] / "workers").write_text("localhost\n" * cfg.flink.taskmanagers)
    (d["conf"] / "masters").write_text(f"localhost:{cfg.flink.rest_port}\n")
    # Keep the JVM options Flink ships (module opens Java 17 needs); override the rest.
    java_opts = ""
    for line in (src / "config.yaml").read_text().splitlines():
        if line.strip().startswith("all:"):
            java_opts = line.split("all:", 1)[1].strip()
    settings = {
        "env.java.opts.all": java_opts,
        "env.pid.dir": str(d["pid"]),
        "env.log.dir": str(d["log"]),
        "jobmanager.rpc.address": "localhost",
        "jobmanager.rpc.port": str(cfg.flink.rpc_port),
        "jobmanager.bind-host": "localhost",
        "jobmanager.memory.process.size": cfg.flink.jobmanager_memory,
        "taskmanager.bind-host": "localhost",
        "taskmanager.host": "localhost",
        "taskmanager.numberOfTaskSlots": str(cfg.flink.taskmanager_slots),
        "taskmanager.memory.process.size": cfg.flink.taskmanager_memory,
        "rest.address": "localhost",
        "rest.bind-address": "localhost",
        "rest.port": str(cfg.flink.rest_port),
        "io.tmp.dirs": str(d["tmp"]),
        # a task stuck in native code (see submit_supervised) ignores interrupts: Flink's own
        # watchdog then stops its taskmanager after this long instead of the default 180 s
        "task.cancellation.timeout": str(int(cfg.flink.task_cancellation_timeout_s * 1000)),
        **base_configuration(cfg),
    }
    text = "# written by `feedrank flink up` from feedrank.toml; edits are overwritten\n"
    text += "".join(f"{k}: {_yaml_value(v)}\n" for k, v in settings.items())
    (d["conf"] / "config.yaml").write_text(text)
    return d["conf"]


def rest_overview(cfg: Config, timeout: float = 1.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://localhost:{cfg.flink.rest_port}/overview", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def cluster_pids(cfg: Config) -> list[int]:
    """Pids recorded by flink-daemon.sh in our pid dir that are still alive."""
    import psutil

    pids = []
    for pf in cluster_dirs(cfg)["pid"].glob("*.pid"):
        for tok in pf.read_text().split():
            if tok.isdigit() and psutil.pid_exists(int(tok)):
                pids.append(int(tok))
    return pids


def cluster_up(cfg: Config) -> str:
    """Start jobmanager + taskmanager (idempotent); wait until a taskmanager registered."""
    require_java()
    ov = rest_overview(cfg)
    if ov is not None:
        if cluster_pids(cfg):
            return f"already running: http://localhost:{cfg.flink.rest_port}"
        raise ServiceError(f"port {cfg.flink.rest_port} serves another Flink cluster feedrank did not start")
    if port_open("127.0.0.1", cfg.flink.rest_port):
        raise ServiceError(f"port {cfg.flink.rest_port} is in use; set FEEDRANK_FLINK_REST_PORT")
    write_cluster_conf(cfg)
    env = cluster_environ(cfg)
    r = subprocess.run(["bash", str(flink_home() / "bin" / "start-cluster.sh")], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise ServiceError(f"start-cluster.sh failed: {r.stdout[-800:]} {r.stderr[-800:]}")
    deadline = time.monotonic() + cfg.flink.startup_timeout_s
    while time.monotonic() < deadline:
        ov = rest_overview(cfg)
        if ov and ov.get("taskmanagers", 0) >= cfg.flink.taskmanagers:
            return f"started: http://localhost:{cfg.flink.rest_port} ({ov['slots-total']} slots)"
        time.sleep(0.5)
    cluster_down(cfg)
    raise ServiceError(f"Flink cluster not ready after {cfg.flink.startup_timeout_s}s; logs in {cluster_dirs(cfg)['log']}")


def cluster_down(cfg: Config) -> str:
    """Stop the cluster we started; kill leftovers recorded in our pid dir."""
    import psutil

    pids = cluster_pids(cfg)
    if not pids:
        return "not running"
    env = cluster_environ(cfg)
    subprocess.run(["bash", str(flink_home() / "bin" / "stop-cluster.sh")], env=env, capture_output=True, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)
    left = []
    for p in pids:
        try:
            proc = psutil.Process(p)
            proc.kill()
            left.append(proc)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)  # SIGKILL is asynchronous: return once they are gone
    for pf in cluster_dirs(cfg)["pid"].glob("*.pid"):
        pf.unlink(missing_ok=True)
    return "stopped"


def submit(cfg: Config, job_py: Path, args: list[str], detached: bool = True,
           restore: Path | None = None) -> subprocess.CompletedProcess:
    """`flink run -py job.py -pyexec <venv python> [-s CHECKPOINT]` against our standalone cluster.

    The job gets ``--feedrank-config FILE``: the exact effective configuration of the
    caller (file + env overrides), so the cluster-side job reads what the caller meant.
    ``restore``: a retained checkpoint the job starts from (sources at its offsets, operators with its state).
    """
    conf_file = cluster_dirs(cfg)["conf"] / f"feedrank-{job_py.stem}.json"
    conf_file.parent.mkdir(parents=True, exist_ok=True)
    conf_file.write_text(cfg.model_dump_json())
    args = ["--feedrank-config", str(conf_file), *args]
    argv = [
        "bash", str(flink_home() / "bin" / "flink"), "run",
        "-m", f"localhost:{cfg.flink.rest_port}",
        *(["--detached"] if detached else []),
        *(["--fromSavepoint", restore.as_uri()] if restore is not None else []),
        "-py", str(job_py),
        "-pyexec", sys.executable,
        "-pyclientexec", sys.executable,
        *args,
    ]
    return subprocess.run(argv, env=cluster_environ(cfg), capture_output=True, text=True, cwd=str(PROJECT_ROOT))


def live_taskmanagers(cfg: Config) -> list[int]:
    """Pids of our taskmanager processes that are alive: processes, not the jobmanager's count,
    since a stopped taskmanager stays registered until its heartbeat times out."""
    import psutil

    alive = []
    for pf in cluster_dirs(cfg)["pid"].glob("*taskexecutor*.pid"):
        for t in pf.read_text().split():
            try:
                if t.isdigit() and psutil.Process(int(t)).status() != psutil.STATUS_ZOMBIE:
                    alive.append(int(t))
            except psutil.NoSuchProcess:
                pass
    return alive


def _listening_ports(pid: int) -> set[int]:
    import psutil

    try:
        return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _embeds_python(pid: int) -> bool:
    """Whether the JVM has loaded libpython: it ran a thread-mode Python job at some time."""
    try:
        return "libpython" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def recycle_taskmanagers(cfg: Config, timeout_s: float = 60.0) -> list[int]:
    """Stop the idle taskmanagers that ran a Python job before; returns their pids.

    pemja loads libpython once per JVM and cannot load it again for a later job's classloader
    (NoSuchFieldException: loadedLibraryNames on Java 17), so a taskmanager whose job was
    cancelled cannot take the next Python job: resubmitting (to resume from a checkpoint) would
    land on it and fail. Idle means all its slots free (REST); "ran Python" means libpython is
    mapped into the process; the pid is matched to the REST entry by the data port it listens on.
    """
    import psutil

    tms = (rest(cfg, "/taskmanagers") or {}).get("taskmanagers", [])
    idle_ports = {int(t["dataPort"]) for t in tms if t.get("freeSlots") == t.get("slotsNumber")}
    stale = {p: _listening_ports(p) & idle_ports for p in live_taskmanagers(cfg) if _embeds_python(p)}
    stale = {p: ports for p, ports in stale.items() if ports}
    for p in stale:
        try:
            psutil.Process(p).terminate()
        except psutil.NoSuchProcess:
            pass
    ports = set().union(*stale.values()) if stale else set()
    deadline = time.monotonic() + timeout_s
    while stale and time.monotonic() < deadline:
        alive = [p for p in stale if _alive(p)]
        registered = {int(t["dataPort"]) for t in (rest(cfg, "/taskmanagers") or {}).get("taskmanagers", [])}
        if not alive and not registered & ports:
            break
        time.sleep(0.5)
    return sorted(stale)


def ensure_taskmanagers(cfg: Config, timeout_s: float | None = None) -> int:
    """Start taskmanagers until ``flink.taskmanagers`` are registered (one may have been stopped
    by Flink's cancellation watchdog, or recycled after its Python job ended); returns how many were started."""
    if rest_overview(cfg) is None:
        raise ServiceError("the Flink cluster is not running: `feedrank flink up`")
    recycle_taskmanagers(cfg)
    missing = cfg.flink.taskmanagers - len(live_taskmanagers(cfg))
    for _ in range(missing):
        r = subprocess.run(["bash", str(flink_home() / "bin" / "taskmanager.sh"), "start"], env=cluster_environ(cfg),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ServiceError(f"taskmanager.sh start failed: {r.stdout[-800:]} {r.stderr[-800:]}")
    deadline = time.monotonic() + (timeout_s or cfg.flink.startup_timeout_s)
    while missing > 0 and time.monotonic() < deadline:
        ov = rest_overview(cfg) or {}
        if ov.get("taskmanagers", 0) >= cfg.flink.taskmanagers and ov.get("slots-available", 0) > 0:
            break
        time.sleep(0.5)
    return max(missing, 0)


def submit_supervised(cfg: Config, job_py: Path, args: list[str], attempts: int = 3,
                      say: Any = print, restore: Path | None = None) -> str:
    """Submit a streaming job and return its id once every operator has opened.

    Measured: now and then a PyFlink thread-mode operator never left INITIALIZING (its Python
    ``open`` never returned). The cause found so far is fixed (see ``feedrank.embedded_sys_path``);
    any other native deadlock at start-up looks the same, so a supervisor restarts such a job, as a
    Kubernetes operator would: cancel it, let Flink's cancellation watchdog stop the taskmanager
    whose task thread is stuck in native code (``flink.task_cancellation_timeout_s``), start a
    replacement taskmanager and submit again, at most ``attempts`` times. A job that fails is
    reported with Flink's root exception, never retried blindly.
    """
    from jobs.startup_stacks import read_dumps

    for attempt in range(1, attempts + 1):
        ensure_taskmanagers(cfg)
        submitted_at = time.time()
        r = submit(cfg, job_py, args, restore=restore)
        m = re.search(r"JobID ([0-9a-f]{32})", r.stdout)
        if r.returncode != 0 or not m:
            raise ServiceError(f"flink run {job_py.name} failed: {(r.stdout + r.stderr)[-2000:]}")
        job_id = m.group(1)
        deadline = time.monotonic() + cfg.flink.startup_timeout_s
        state, vertices = "UNKNOWN", {}
        while time.monotonic() < deadline:
            state, vertices = job_state(cfg, job_id)
            if state in ("FAILED", "CANCELED", "FINISHED"):
                raise ServiceError(f"{job_py.name} job {job_id} is {state}: {job_failure(cfg, job_id)}")
            if state == "RUNNING" and vertices and all(v in ("RUNNING", "FINISHED") for v in vertices.values()):
                return job_id
            time.sleep(1.0)
        stuck = ", ".join(f"{k} {v}" for k, v in vertices.items() if v not in ("RUNNING", "FINISHED"))
        say(f"{job_py.name} job {job_id}: not running after {cfg.flink.startup_timeout_s:.0f} s ({stuck or state}); "
            f"attempt {attempt} of {attempts}")
        say(read_dumps(cfg, since=submitted_at) or "no Python stack dump: the operators never reached their own open")
        before = set(live_taskmanagers(cfg))
        rest(cfg, f"/jobs/{job_id}?mode=cancel", method="PATCH")
        # wait for the cancel, and for the stuck taskmanager to stop (it does within the cancellation
        # timeout when the task ignores the cancel; a task that reacts leaves every taskmanager up)
        end = time.monotonic() + cfg.flink.task_cancellation_timeout_s + 30
        while time.monotonic() < end:
            if job_state(cfg, job_id)[0] in ("CANCELED", "FAILED", "UNKNOWN") and before - set(live_taskmanagers(cfg)):
                break
            time.sleep(1.0)
        said_stopped = sorted(before - set(live_taskmanagers(cfg)))
        say(f"{job_py.name} job {job_id}: {job_state(cfg, job_id)[0]}; taskmanagers stopped by Flink: {said_stopped or 'none'}")
    raise ServiceError(f"{job_py.name}: operators did not open in {attempts} attempts; logs in {cluster_dirs(cfg)['log']}")


def await_checkpoint(cfg: Config, job_id: str, name: str, timeout_s: float | None = None) -> int | None:
    """Wait until the running job completed its first checkpoint; returns the completed count, or None
    for a job without periodic checkpoints (nothing to wait for).

    Every operator RUNNING is not yet a working streaming job: one whose barriers never get through
    (a stuck operator, a source that cannot read) has no state to resume from. A job that completes
    none within ``timeout_s`` (``flink.startup_timeout_s``), or stops meanwhile, raises ServiceError."""
    settings = rest(cfg, f"/jobs/{job_id}/checkpoints/config")
    # Flink answers 404 for a job without checkpointing, or gives it an interval of Long.MAX_VALUE
    if not settings or not 0 < int(settings.get("interval", 0)) < 2**63 - 1:
        return None
    timeout_s = cfg.flink.startup_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        completed = int(((rest(cfg, f"/jobs/{job_id}/checkpoints") or {}).get("counts") or {}).get("completed", 0))
        if completed > 0:
            return completed
        state = job_state(cfg, job_id)[0]
        if state in ("FAILED", "CANCELED", "FINISHED"):
            raise ServiceError(f"{name} job {job_id} is {state} before its first checkpoint: {job_failure(cfg, job_id)}")
        time.sleep(1.0)
    raise ServiceError(f"{name} job {job_id}: {state.lower()}, but no checkpoint completed in {timeout_s:.0f} s: "
                       f"see {cluster_dirs(cfg)['log']}")
