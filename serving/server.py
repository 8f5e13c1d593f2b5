"""The serving process: a :class:`serving.service.FeedService` on a gRPC server with health, reflection
and the metrics endpoint (`feedrank serve`). Start-up loads the models, seeds the sponsored
inventory when none exists, warms the funnel up, and binds the port; health says SERVING only once
:meth:`Server.readiness` finds every model and index a pipeline needs loaded and usable (a search
of the index returns posts the catalog knows, a ranking comes back without a model or index
missing). Until then it says NOT_SERVING, with the reasons logged, and checks again every second."""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from core.config import Config
from serving import funnel
from serving.components import Query, UserContext
from features.progress import read_progress
from serving.edge import tls_files
from serving.feed import Pipelines
from serving.funnel import Pipeline
from serving.metrics import Metrics
from serving.protos import pb
from serving.service import FeedService, access
from serving.state import ADS_KEY, RedisUnavailable, ServingState

log = logging.getLogger("feedrank.serving")


# ---------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _Undecodable:
    """What a request's bytes that are not its message parse to (instead of gRPC's logged traceback and INTERNAL)."""

    message: str
    error: str


def add_feed_service(service: FeedService, server: grpc.Server, metrics: Metrics) -> None:
    """Register the FeedService like the generated ``add_FeedServiceServicer_to_server``, with a
    deserializer that never raises: bytes that are not the request message are answered
    INVALID_ARGUMENT before any other work, counted in ``feedrank_rpcs_total``, and logged
    without a traceback."""
    from google.protobuf.message import DecodeError

    desc = pb.DESCRIPTOR.services_by_name["FeedService"]

    def parser(cls: Any) -> Callable[[bytes], Any]:
        def parse(data: bytes) -> Any:
            try:
                return cls.FromString(data)
            except (DecodeError, RuntimeError, ValueError) as e:
                return _Undecodable(cls.DESCRIPTOR.name, str(e)[:200])
        return parse

    def behaviour(name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        method = getattr(service, name)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                metrics.rpcs.labels(name, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
                access.info(name, extra={"fields": {"rpc": name, "code": "INVALID_ARGUMENT", "error": request.error}})
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {request.message} message")
            return method(request, context)
        return call

    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            behaviour(m.name), request_deserializer=parser(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
        for m in desc.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


def seed_ads(state: ServingState, n: int, seed: int = 7) -> int:
    """A small sponsored inventory when none exists: recent original, unflagged posts with log-normal bids."""
    if n <= 0 or state.catalog.n == 0:
        return 0
    r = state.redis.client
    if r.hlen(ADS_KEY):
        return 0
    cat = state.catalog
    ok = np.flatnonzero((cat.author[: cat.n] >= 0) & cat.original[: cat.n] & ~cat.flagged[: cat.n])
    recent = ok[np.argsort(-cat.published_ms[ok], kind="stable")[: max(n * 20, n)]]
    rng = np.random.default_rng(seed)
    pick = rng.choice(recent, size=min(n, recent.size), replace=False)
    bids = np.round(rng.lognormal(0.0, 0.5, size=pick.size), 3)
    r.hset(ADS_KEY, mapping={str(int(p)): float(b) for p, b in zip(pick, bids)})
    return int(pick.size)


def limit_malloc_arenas(n: int) -> None:
    """Cap glibc's malloc arenas (``M_ARENA_MAX``) before the server's threads start: glibc gives each thread
    that finds the arenas busy a new one, up to 8 per core, and each keeps the memory freed into it."""
    import ctypes

    if n <= 0:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        log.info("malloc arenas not limited (no glibc mallopt)")


class Server:
    """A running FeedService: gRPC + health + reflection (+ metrics endpoint)."""

    def __init__(self, cfg: Config, bootstrap_dir: str | Path | None = None, clock: Callable[[], int] | None = None,
                 port: int | None = None, metrics_port: int | None = None, workers: int = 8,
                 reuse_port: bool = False, pipelines: dict[str, Pipeline] | None = None, http_port: int | None = None):
        """``http_port``: the HTTP/JSON API's port (None = serving.http_port; 0 = none)."""
        import faiss
        import torch
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from serving.ab_tests import Experiments
        from serving.model_loader import ModelLoader

        from serving import tracing

        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        limit_malloc_arenas(cfg.serving.malloc_arenas)
        tracing.configure(cfg)
        self.cfg = cfg
        self.metrics = Metrics()
        self.state = ServingState(cfg, clock=clock, bootstrap_dir=bootstrap_dir)
        self.loader = ModelLoader(cfg, self.state)
        self.loader.load()
        self.state.loader = self.loader
        self.loader.poll_delta()
        self.metrics.set_models(self.loader.models.versions())
        seed_ads(self.state, cfg.candidates.ad_inventory)
        try:
            self.state.refresh()
        except RedisUnavailable:
            pass
        self.state.start(refresh_s=cfg.serving.feature_refresh_ms / 1000.0)
        self.loader.start()
        experiments = Experiments.load(cfg.path(cfg.serving.experiments_file)).check(cfg)
        self.service = FeedService(cfg, self.state, self.loader, experiments, self.metrics,
                                   Pipelines.declared(pipelines))
        self._warm_up()
        from concurrent.futures import ThreadPoolExecutor

        # Beyond max_concurrent_rpcs in flight, gRPC answers RESOURCE_EXHAUSTED at once: an overloaded
        # worker sheds load instead of queueing requests until every one of them misses its deadline.
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers),
                                  options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
                                  maximum_concurrent_rpcs=cfg.serving.max_concurrent_rpcs)
        add_feed_service(self.service, self.server, self.metrics)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["FeedService"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server)
        bind = f"{cfg.serving.host}:{port if port is not None else cfg.serving.port}"
        tls = tls_files(cfg)
        if tls:
            key, cert = (Path(f).read_bytes() for f in (tls[1], tls[0]))
            self.port = self.server.add_secure_port(bind, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {cfg.serving.host}:{port or cfg.serving.port}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.start()
        self.not_ready = self.readiness()
        mport = metrics_port if metrics_port is not None else cfg.serving.metrics_port
        self.metrics_port = mport
        if mport:
            self.metrics.serve(mport, cfg.serving.host)
        self.http = None
        hport = cfg.serving.http_port if http_port is None else http_port
        if hport:
            from serving.http_api import HttpServer

            self.http = HttpServer(self.service, cfg.serving.host, hport, reuse_port=reuse_port,
                                   ready=lambda: not self.not_ready, tls=tls)
        self._stop = threading.Event()
        if self.not_ready:
            log.error("NOT_SERVING until ready: %s", "; ".join(self.not_ready))
        else:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watch = threading.Thread(target=self._watch_models, daemon=True, name="model-metrics")
        self._watch.start()
        gc.collect()
        gc.freeze()  # start-up objects never move to older generations' scans again

    def _set_health(self, status: int) -> None:
        for name in ("", pb.DESCRIPTOR.services_by_name["FeedService"].full_name):
            self.health.set(name, status)

    def readiness(self) -> list[str]:
        """Why this server cannot serve yet ([] = ready): a model or the index not loaded, an index whose
        posts the catalog does not know, a warm-up ranking that came back degraded for a missing model or
        index, or without ANN candidates."""
        m = self.loader.models
        if m is None:
            return ["models not loaded"]
        missing = [name for name, v in (("light", m.light), ("heavy", m.heavy), ("two_tower", m.towers),
                                        ("retrieval", m.index)) if v is None]
        if missing:
            return [f"models not loaded: {', '.join(missing)}"]
        problems = []
        if self.state.catalog.n == 0:
            problems.append("the post catalog is empty")
        if getattr(m.index.index, "ntotal", 0) == 0:
            problems.append(f"retrieval index {m.retrieval_version} is empty")
        if problems:
            return problems
        q = self._warm_up(rounds=1)
        model_reasons = [r for r in q.degraded if r.startswith(("no_user_embedding", "pinned_model_unavailable",
                                                                 "source_error:", "source_timeout:AnnSource"))]
        if model_reasons:
            problems.append(f"a warm-up ranking was degraded: {', '.join(model_reasons)}")
        if not q.source_counts.get("AnnSource"):
            problems.append(f"the retrieval index {m.retrieval_version} returned no post the catalog knows "
                            f"({self.state.catalog.n} posts; built for another corpus?)")
        return problems

    def _warm_up(self, rounds: int = 3) -> Query:
        """One full HOME ranking before SERVING: first FAISS search, first TorchScript call (profiling
        executor) and numpy paths are several times slower than later ones."""
        from serving.ab_tests import Params

        home = self.service.feeds.pipelines.feeds["home"]
        for _ in range(rounds):
            q = Query(request_id="warm-up", user_id=-1, feed_type="home", now_ms=self.state.clock(), limit=20,
                      params=Params(tuple(self.cfg.heads.weights().values()), self.cfg.rerank), experiments={},
                      deadline=time.monotonic() + 5.0)
            q.user = UserContext(user_id=-1, cached_candidates=np.zeros(0, dtype=np.int64))
            q.user.embedding = self.loader.models.user_embedding(q.user)
            funnel.run(home, q, self.state, hydrate_query=False)
        return q

    def _watch_models(self) -> None:
        from models.shadow import DECISION_COUNTS

        from grpc_health.v1 import health_pb2

        tick = 0
        while not self._stop.wait(1.0):
            if self.not_ready:
                self.not_ready = self.readiness()
                if not self.not_ready:
                    log.info("ready: SERVING")
                    self._set_health(health_pb2.HealthCheckResponse.SERVING)
            self.metrics.set_models(self.loader.models.versions())
            self.metrics.shadow_active.set(1 if self.loader.shadow_version else 0)
            for model, versions in self.loader.refused.items():
                self.metrics.models_refused.labels(model).set(len(versions))
            tick += 1
            if tick % 5 == 0:
                try:
                    counts = self.state.redis.run(lambda r: r.hgetall(DECISION_COUNTS))
                    for k, v in counts.items():
                        self.metrics.shadow_decisions.labels(k.decode()).set(int(v))
                    progress = self.state.redis.run(
                        lambda r: {job: read_progress(self.cfg, job, r) for job in ("features", "learner")})
                    self.metrics.jobs.update(progress, self.state.clock(), int(time.time() * 1000))
                except Exception as e:  # noqa: BLE001 - the gauge keeps its last value; the health check reports Redis
                    log.warning("shadow decision counts or job progress unavailable: %s", e)

    @property
    def address(self) -> str:
        return f"{self.cfg.serving.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        from grpc_health.v1 import health_pb2

        self.health.enter_graceful_shutdown()
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        self.server.stop(grace).wait()
        self.service.feeds.effects.stop()
        self.loader.stop()
        self.state.stop()
        del health_pb2

    def wait(self) -> None:
        self.server.wait_for_termination()
