"""Detached service processes with pid files under ``var/run``.

A pid file records the pid and the executable that ``up`` started, so ``down`` stops
only what ``up`` started: a recycled pid now owned by another program is never killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from core.config import Config
from core.services import ServiceError, port_open
from serving.edge import auth_env


@dataclass
class Service:
    """One managed process: how to start it and how to tell it is healthy."""

    name: str
    argv: list[str]
    host: str
    port: int
    run_dir: Path
    log_dir: Path
    health: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    startup_timeout_s: float = 15.0

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def _recorded(self) -> dict | None:
        try:
            return json.loads(self.pid_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def pid(self) -> int | None:
        """The pid of our running process, or None (a stale pid file is removed)."""
        rec = self._recorded()
        if not rec:
            return None
        if _is_ours(rec["pid"], rec["exe"]):
            return int(rec["pid"])
        self.pid_file.unlink(missing_ok=True)
        return None

    def healthy(self) -> bool:
        try:
            return bool(self.health())
        except Exception:
            return False

    def start(self) -> str:
        """Start (idempotent). Returns 'started' or 'already running'."""
        if self.pid() is not None:
            if self._wait_healthy(self.startup_timeout_s):
                return "already running"
            raise ServiceError(f"{self.name}: running (pid {self.pid()}) but not healthy; see {self.log_file}")
        if port_open(self.host, self.port):
            raise ServiceError(
                f"{self.name}: port {self.host}:{self.port} is already in use by a process feedrank did not start; "
                f"stop it or configure another port"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.cwd) if self.cwd else None,
            env={**os.environ, **self.env},
            start_new_session=True,  # survives the CLI; `down` kills the whole group
        )
        log.close()
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "exe": self.argv[0], "argv": self.argv}))
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise ServiceError(f"{self.name} exited with code {proc.returncode}: {tail(self.log_file)}")
            if self.healthy():
                return "started"
            time.sleep(0.1)
        self.stop()
        raise ServiceError(f"{self.name} not healthy after {self.startup_timeout_s}s: {tail(self.log_file)}")

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 10.0) -> str:
        """Stop our process (and its group). Returns 'stopped' or 'not running'."""
        pid = self.pid()
        if pid is None:
            return "not running"
        _terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)
        return "stopped"

    def status(self) -> dict:
        pid = self.pid()
        return {
            "name": self.name,
            "pid": pid,
            "address": f"{self.host}:{self.port}",
            "running": pid is not None,
            "healthy": pid is not None and self.healthy(),
            "log": str(self.log_file),
        }


def _is_ours(pid: int, exe: str) -> bool:
    """Is pid a live process running ``exe``? (Redis rewrites its title, so check the binary.)"""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        real = p.exe()
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    want = os.path.realpath(exe) if os.path.sep in exe else exe
    first = cmd[0].split()[0] if cmd else ""
    return real == want or os.path.basename(real) == os.path.basename(want) or os.path.basename(first) == os.path.basename(exe)


def _terminate(pid: int, timeout: float) -> None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _gone(pid):
                _reap(pid)
                return
            time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_group(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM a child started with ``start_new_session=True`` and its whole process group (a CLI and
    the JVM or workers under it); SIGKILL what is left after ``timeout``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


class ProcessGroup:
    """Child processes (the demo's, an experiment's), each in its own process group: their JVMs die
    with them. ``stop`` sends SIGINT first (the jobs cancel themselves cleanly), then SIGKILL."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                log = self.log_dir / (name + ".log")
                raise RuntimeError(f"{name} exited ({p.returncode}); the end of {log}:\n{tail(log)}")

    def stop(self) -> None:
        for p in self.procs.values():  # SIGINT first: the jobs cancel themselves cleanly
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 30
        for p in self.procs.values():
            try:
                p.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever is left in the group (a JVM)
            except ProcessLookupError:
                pass


def child_env(cfg: Config, **extra: str) -> dict[str, str]:
    """The environment of a child process on ``cfg``'s stack: its data dir, Redis, event log, model
    store, ports and auth keys; every other FEEDRANK_* of this process is dropped."""
    # FLINK_LOG_DIR may be inherited from a caller that ran a job itself: each job picks its own
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith("FEEDRANK_") or k == "FEEDRANK_CONFIG") and k != "FLINK_LOG_DIR"}
    env.update({"FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir), "FEEDRANK_REDIS": cfg.redis.uri,
                "FEEDRANK_EVENTS": cfg.events.uri, "FEEDRANK_MODEL_STORE": cfg.resolve_uri(cfg.model_store.uri),
                "FEEDRANK_LAKE_URI": cfg.resolve_uri(cfg.lake.uri),
                "FEEDRANK_SERVING_PORT": str(cfg.serving.port), "FEEDRANK_SERVING_METRICS_PORT": str(cfg.serving.metrics_port),
                "FEEDRANK_SERVING_HTTP_PORT": str(cfg.serving.http_port),
                "FEEDRANK_SERVING_WORKERS": "1", "FEEDRANK_STREAMING_BOOTSTRAP_WORLD": "", **auth_env(cfg), **extra})
    return env
