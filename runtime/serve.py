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


def supervise_workers(argv: list[str], n: int, stop: threading.Event, say: Callable[[str], None] = print) -> None:
    """Run ``n`` worker processes (``argv`` + ``--worker-index i``) until ``stop`` is set or Ctrl-C,
    starting again any that exits; then terminate them (SIGKILL after 30 s)."""
    procs = [subprocess.Popen(argv + ["--worker-index", str(i)]) for i in range(n)]
    try:
        while not stop.wait(1.0):
            for i, p in enumerate(procs):
                if p.poll() is not None:  # a worker died: say so and start it again
                    say(f"[yellow]worker {i} exited ({p.returncode}); restarting[/yellow]")
                    procs[i] = subprocess.Popen(argv + ["--worker-index", str(i)])
    except KeyboardInterrupt:
        pass
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def run_worker(cfg: Config, world_dir: Path | None, origin: dict[str, int], port: int, index: int, reuse_port: bool,
               stop: threading.Event, say: Callable[[str], None] = print) -> None:
    """One FeedService process on ``port`` (metrics on serving.metrics_port + ``index``) until ``stop``
    or Ctrl-C. Raises ServiceError when the server cannot start."""
    from serving.server import Server

    clock = None
    if origin:
        wall0, sim0 = origin["wall0_ms"], origin["sim0_ms"]
        clock = lambda: sim0 + int(time.time() * 1000) - wall0  # noqa: E731 - one clock for every worker
    try:
        server = Server(cfg, bootstrap_dir=world_dir, clock=clock, port=port,
                        metrics_port=cfg.serving.metrics_port + index if cfg.serving.metrics_port else 0,
                        reuse_port=reuse_port)
    except Exception as e:  # noqa: BLE001 - whatever stops the start, the operator gets one line
        raise ServiceError(f"cannot start the FeedService: {e}") from None
    say(f"FeedService worker {index} on {server.address} (metrics :{server.metrics_port}); "
        f"models {server.loader.models.versions()}")
    try:
        while not stop.wait(5.0):
            if origin:
                republish_clock(cfg, origin)
    except KeyboardInterrupt:
        pass
    server.stop()
