"""Prometheus metrics of one serving replica (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05,
                 0.075, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rpc_latency = Histogram("feedrank_rpc_latency_seconds", "RPC latency", ["rpc"], registry=r,
                                     buckets=STAGE_BUCKETS)
        self.rpcs = Counter("feedrank_rpcs_total", "RPCs by status code", ["rpc", "code"], registry=r)
        self.stage_latency = Histogram("feedrank_stage_latency_seconds", "GetFeed latency per funnel stage", ["stage"],
                                       registry=r, buckets=STAGE_BUCKETS)
        self.candidates = Counter("feedrank_candidates_total", "Candidates fetched per source", ["source"], registry=r)
        self.cache = Counter("feedrank_result_cache_total", "Result cache lookups on refresh", ["result"], registry=r)
        self.degraded = Counter("feedrank_degraded_responses_total", "Responses served degraded", ["reason"], registry=r)
        self.model = Gauge("feedrank_model_version_info", "Model version in use (value 1)", ["model", "version"],
                           registry=r)
        self.reloads = Counter("feedrank_model_reloads_total", "Hot reloads of models", registry=r)
        self.exposures = Counter("feedrank_exposures_logged_total", "Exposure events written", registry=r)
        self.side_effect_errors = Counter("feedrank_side_effect_errors_total", "Failed side effects", ["effect"],
                                          registry=r)
        self._versions: dict[str, str] = {}

    def set_models(self, versions: dict[str, str]) -> None:
        for model, v in versions.items():
            old = self._versions.get(model)
            if old == v:
                continue
            if old is not None:
                self.model.remove(model, old)
            self.model.labels(model, v).set(1)
            self._versions[model] = v

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
