"""`feedrank serve` as processes: the supervisor that keeps N workers on one port (SO_REUSEPORT;
the kernel spreads connections), a worker's run loop, and the serving clock they share.

With a world (`--world`), serving runs on a clock that continues from the world's end: the
supervisor fixes its origin once, hands it to every worker on the command line (a restarted worker
agrees with the others without reading Redis) and each worker writes it back to Redis where it
is missing, so readers (the demo, `feedrank sim clients`) find it after a Redis restart.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from core.config import Config
from core.corpus import Corpus
from core.services import ServiceError
from features.connection import redis_client
from serving.state import SERVING_CLOCK

log = logging.getLogger("feedrank.serving")
CLOCK_KEYS = ("wall0_ms", "sim0_ms", "world_end_ms")


def publish_clock(cfg: Config, world_dir: Path) -> dict[str, int]:
    """The serving clock's origin for a world (now = the world's end), written to Redis."""
    try:
        end = Corpus.load_corpus(world_dir).end_ms
    except FileNotFoundError as e:
        raise ServiceError(str(e)) from None
    origin = {"wall0_ms": int(time.time() * 1000), "sim0_ms": end, "world_end_ms": end}
    try:
        redis_client(cfg).hset(SERVING_CLOCK, mapping=origin)
    except Exception as e:  # noqa: BLE001 - any connection error: the stack is not up
        raise ServiceError(f"redis at {cfg.redis.uri} is not reachable ({e}): run `feedrank up` first") from None
    return origin


def republish_clock(cfg: Config, origin: dict[str, int]) -> None:
    """Write the clock's origin where it is missing (HSETNX: every worker writes the same values)."""
    try:
        with redis_client(cfg).pipeline(transaction=False) as p:
            for k, v in origin.items():
                p.hsetnx(SERVING_CLOCK, k, v)
            p.execute()
    except Exception as e:  # noqa: BLE001 - Redis down: serving goes on degraded, the next try writes it
        log.warning("serving clock not republished (%s)", e)


def server_offset_ms(cfg: Config) -> int:
    """How far the running server's clock is past the world's end (0 when no server published one)."""
    try:
        raw = redis_client(cfg).hgetall(SERVING_CLOCK)
        if raw:
            return int(time.time() * 1000) - int(raw[b"wall0_ms"]) + int(raw[b"sim0_ms"]) - int(raw[b"world_end_ms"])
    except Exception:  # noqa: BLE001 - no server info: assume it started with the world's end just now
        pass
    return 0


def supervise(commands: list[list[str]], names: list[str], stop: threading.Event,
              say: Callable[[str], None] = print, started: Callable[[], None] | None = None) -> None:
    """Run every command as a process until ``stop`` is set or Ctrl-C, starting again any that exits
    (``names`` say which in the message); then terminate them (SIGKILL after 30 s). ``started`` runs
    once after the first start, in the supervising thread (e.g. to start the balancer)."""
    procs = [subprocess.Popen(c) for c in commands]
    try:
        if started is not None:
            started()
        while not stop.wait(1.0):
            for i, p in enumerate(procs):
                if p.poll() is not None:  # a worker died: say so and start it again
                    say(f"[yellow]{names[i]} exited ({p.returncode}); restarting[/yellow]")
                    procs[i] = subprocess.Popen(commands[i])
    except KeyboardInterrupt:
        pass
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def supervise_workers(argv: list[str], n: int, stop: threading.Event, say: Callable[[str], None] = print) -> None:
    """Run ``n`` worker processes (``argv`` + ``--worker-index i``) until ``stop`` is set or Ctrl-C,
    starting again any that exits; then terminate them (SIGKILL after 30 s)."""
    supervise([argv + ["--worker-index", str(i)] for i in range(n)], [f"worker {i}" for i in range(n)], stop, say)


def replica_ports(port: int, replicas: int) -> list[int]:
    """Replica i of `feedrank serve --replicas N` listens on ``port + 1 + i``; the balancer on ``port``."""
    return [port + 1 + i for i in range(replicas)]


def wait_ready(cfg: Config, addresses: list[str], stop: threading.Event, timeout_s: float = 900.0) -> bool:
    """Until every address's health says SERVING (True), ``stop`` is set or the timeout passes (False)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.edge import open_channel

    pending = set(addresses)
    deadline = time.monotonic() + timeout_s
    while pending and not stop.is_set() and time.monotonic() < deadline:
        for a in sorted(pending):
            with open_channel(cfg, a) as ch:
                try:
                    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if h.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.discard(a)
                except grpc.RpcError:
                    pass
        stop.wait(0.5)
    return not pending


def run_replicas(cfg: Config, argv: list[str], port: int, replicas: int, workers: int, stop: threading.Event,
                 say: Callable[[str], None] = print, http_port: int = 0) -> None:
    """`feedrank serve --replicas N`: N replicas (``argv`` + their port and metrics ports; each with
    ``workers`` processes) on ``port + 1 .. port + N``, and nginx balancing gRPC calls over them on
    ``port`` once every replica is ready (:mod:`runtime.balancer`); all supervised until ``stop``. With
    ``http_port`` the replicas' HTTP APIs are on ``http_port + 1 ..`` and nginx balances them on ``http_port``."""
    from runtime.balancer import nginx_command

    host = cfg.serving.host
    ports = replica_ports(port, replicas)
    http_ports = replica_ports(http_port, replicas) if http_port else [0] * replicas
    commands = [argv + ["--port", str(p), "--workers", str(workers), "--http-port", str(h),
                        "--metrics-port", str(cfg.serving.metrics_port + i * workers if cfg.serving.metrics_port else 0)]
                for i, (p, h) in enumerate(zip(ports, http_ports))]
    home = cfg.data_dir / "nginx"
    from serving.edge import tls_files

    nginx = nginx_command(f"{host}:{port}", [f"{host}:{p}" for p in ports], home,
                          http=(f"{host}:{http_port}", [f"{host}:{h}" for h in http_ports]) if http_port else None,
                          tls=tls_files(cfg))
    names = [f"replica {i} (:{p})" for i, p in enumerate(ports)]
    balancer: list[subprocess.Popen] = []

    def start_balancer() -> None:
        if not wait_ready(cfg, [f"{host}:{p}" for p in ports], stop):
            return
        balancer.append(subprocess.Popen(nginx))
        say(f"nginx on {host}:{port} balancing gRPC calls over {replicas} replicas ({home / 'nginx.conf'})")

    def watch_balancer() -> None:
        start_balancer()
        while not stop.wait(1.0):
            if balancer and balancer[0].poll() is not None:
                say(f"[yellow]nginx exited ({balancer[0].returncode}); restarting (see {home / 'error.log'})[/yellow]")
                balancer[0] = subprocess.Popen(nginx)
        for b in balancer:
            b.terminate()
            try:
                b.wait(timeout=10)
            except subprocess.TimeoutExpired:
                b.kill()

    t = threading.Thread(target=watch_balancer, name="balancer", daemon=True)
    supervise(commands, names, stop, say, started=t.start)
    stop.set()
    t.join(timeout=15)


def run_worker(cfg: Config, world_dir: Path | None, origin: dict[str, int], port: int, index: int, reuse_port: bool,
               stop: threading.Event, say: Callable[[str], None] = print, metrics_port: int = -1,
               http_port: int = -1) -> None:
    """One FeedService process on ``port`` (metrics on ``metrics_port`` (default serving.metrics_port) +
    ``index``; the HTTP API on ``http_port``, default serving.http_port, shared by the workers) until
    ``stop`` or Ctrl-C. Raises ServiceError when the server cannot start."""
    from serving.server import Server

    clock = None
    if origin:
        wall0, sim0 = origin["wall0_ms"], origin["sim0_ms"]
        clock = lambda: sim0 + int(time.time() * 1000) - wall0  # noqa: E731 - one clock for every worker
    try:
        base = cfg.serving.metrics_port if metrics_port < 0 else metrics_port
        server = Server(cfg, bootstrap_dir=world_dir, clock=clock, port=port,
                        metrics_port=base + index if base else 0, reuse_port=reuse_port,
                        http_port=None if http_port < 0 else http_port)
    except Exception as e:  # noqa: BLE001 - whatever stops the start, the operator gets one line
        raise ServiceError(f"cannot start the FeedService: {e}") from None
    say(f"FeedService worker {index} on {server.address} (metrics :{server.metrics_port}"
        + (f", HTTP API :{server.http.port}" if server.http else "") + "); "
        f"models {server.loader.models.versions()}")
    try:
        while not stop.wait(5.0):
            if origin:
                republish_clock(cfg, origin)
    except KeyboardInterrupt:
        pass
    server.stop()
