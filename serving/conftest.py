"""Serving test fixtures: one tiny simulated world with trained models and a Feast export,
shared by the serving tests; each test module gets its own Redis and its own server.

Nothing is mocked: real Redis (embedded), real model store, real FAISS index, real gRPC
channel. The server's clock continues from the end of the world's history, so the
world's recent posts are recent to the server.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from core.config import Config, load_config
from core.services import free_port

TINY = {"FEEDRANK_SIM_SCALES_SMALL_USERS": "1500", "FEEDRANK_SIM_SCALES_SMALL_CREATORS": "300",
        "FEEDRANK_SIM_SCALES_SMALL_POSTS": "8000", "FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS": "200000",
        "FEEDRANK_RETRIEVAL_NLIST": "64", "FEEDRANK_RETRIEVAL_NPROBE": "32", "FEEDRANK_CANDIDATES_CELEBRITY_FOLLOWERS": "150",
        # 2 shared cores under a parallel test load: generous source timeouts, so results do not depend on timing
        "FEEDRANK_CANDIDATES_SOURCE_TIMEOUT_MS": "250"}


@dataclass
class ServedWorld:
    root: Path
    world_dir: Path
    env: dict[str, str]
    end_ms: int

    def config(self, **overrides: str) -> Config:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
        env.update(self.env)
        env["FEEDRANK_REDIS"] = f"redis://127.0.0.1:{free_port()}/0"
        env["FEEDRANK_SERVING_EXPERIMENTS_FILE"] = str(self.root / "no-experiments.toml")
        env["FEEDRANK_SERVING_HTTP_PORT"] = "0"  # a test that calls the HTTP API picks a free port
        env.update(overrides)
        return load_config(env)


@pytest.fixture(scope="session")
def served_world(tmp_path_factory: pytest.TempPathFactory) -> ServedWorld:
    """Generate, train (tiny), export: ~1 minute once per test session."""
    from features.feast_repo import export
    from models.store import ModelStore
    from models.train import train_all
    from sim.generate import generate
    from sim.world import World

    root = tmp_path_factory.mktemp("served")
    from serving.edge import embedded_auth

    env = dict(TINY, **embedded_auth())  # this world's servers' own random keys (placeholders are refused)
    env.update(FEEDRANK_PATHS_DATA_DIR=str(root / "var"), FEEDRANK_EVENTS="file://" + str(root / "var" / "events"),
               FEEDRANK_MODEL_STORE="file://" + str(root / "var" / "models"), FEEDRANK_FLINK_REST_PORT=str(free_port()))
    base = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    cfg = load_config({**base, **env})
    wdir = root / "world"
    generate(cfg, "small", 5, wdir)
    train_all(cfg, str(wdir), "all", store=ModelStore.from_config(cfg), heavy_rows=30_000, tt_epochs=2, heavy_epochs=2)
    export(cfg, wdir)
    return ServedWorld(root, wdir, env, World.load(wdir).end_ms)


def world_clock(end_ms: int) -> Callable[[], int]:
    t0 = time.time()
    return lambda: end_ms + int((time.time() - t0) * 1000)


@contextmanager
def running_server(served_world: ServedWorld, clock: Callable[[], int] | None = None, **overrides: str) -> Iterator[Any]:
    """A server on its own embedded Redis, with the Feast user rows materialized; ``overrides``
    are FEEDRANK_* settings (e.g. an event log on a disk a test fills); ``clock`` (epoch ms) defaults to
    the world's, running from its end."""
    from datetime import datetime, timezone

    from features.feast_repo import apply
    from runtime import stack
    from serving.server import Server

    cfg = served_world.config(**overrides)
    stack.up(cfg)
    server = None
    try:
        store = apply(cfg)
        store.materialize(datetime(2020, 1, 1, tzinfo=timezone.utc), datetime(2030, 1, 1, tzinfo=timezone.utc),
                          feature_views=["user_topic", "topic_stats"])
        server = Server(cfg, bootstrap_dir=served_world.world_dir, clock=clock or world_clock(served_world.end_ms), port=0,
                        metrics_port=free_port())
        yield server
    finally:
        if server is not None:
            server.stop(grace=1.0)
        stack.down(cfg)


@pytest.fixture(scope="module")
def serving(served_world: ServedWorld) -> Iterator[Any]:
    with running_server(served_world) as server:
        yield server


@pytest.fixture(scope="module")
def stub(serving: Any) -> Iterator[Any]:
    """A gRPC stub on the module's server."""
    import grpc

    from serving.protos import rpc

    ch = grpc.insecure_channel(serving.address)
    yield rpc.FeedServiceStub(ch)
    ch.close()


def token(cfg: Config, user: int, admin: bool = False, ttl_s: float = 600.0) -> list[tuple[str, str]]:
    from serving.edge import config_token

    return [("authorization", "Bearer " + config_token(cfg, user, admin, ttl_s))]


def serve_process(served_world: ServedWorld, cfg: Config, port: int, log: Path, *args: str,
                  **env_extra: str) -> Any:
    """`feedrank serve <args> --world …` as an operator starts it, on ``cfg``'s stack (its own process
    group, output in ``log``)."""
    import subprocess
    import sys

    from serving.edge import auth_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update(served_world.env)
    env.update({"FEEDRANK_REDIS": cfg.redis.uri, "FEEDRANK_SERVING_PORT": str(port),
                "FEEDRANK_SERVING_METRICS_PORT": str(cfg.serving.metrics_port),
                "FEEDRANK_SERVING_HTTP_PORT": str(cfg.serving.http_port),
                "FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir),
                "FEEDRANK_SERVING_EXPERIMENTS_FILE": cfg.serving.experiments_file, **auth_env(cfg), **env_extra})
    return subprocess.Popen([sys.executable, "-m", "feedrank.cli", "serve", *args, "--log-format", "text",
                             "--world", str(served_world.world_dir)], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    """``check()``'s first truthy value, polled every 0.5 s; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
