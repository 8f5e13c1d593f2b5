"""Prometheus metrics of one serving replica (its own registry, so tests can run several)."""

from __future__ import annotations

import warnings

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        self.component_runs = Counter("feedrank_component_runs_total", "Funnel components run (query hydrators, "
                                      "sources, filters, stages, side effects), by pipeline", ["pipeline", "component"],
                                      registry=r)
        self.candidates = Counter("feedrank_candidates_total", "Candidates fetched per source", ["source"], registry=r)
        self.cache = Counter("feedrank_result_cache_total", "Result cache lookups on refresh", ["result"], registry=r)
        self.shed = Counter("feedrank_shed_total", "GetFeed requests refused at once because the worker's queued "
                            "work exceeded serving.max_queued_ms (also counted as RESOURCE_EXHAUSTED)", registry=r)
        self.degraded = Counter("feedrank_degraded_responses_total", "Responses served degraded", ["reason"], registry=r)
        self.model = Gauge("feedrank_model_version_info", "Model version in use (value 1)", ["model", "version"],
                           registry=r)
        self.reloads = Counter("feedrank_model_reloads_total", "Hot reloads of models", registry=r)
        self.exposures = Counter("feedrank_exposures_logged_total", "Exposure events written", registry=r)
        self.side_effect_errors = Counter("feedrank_side_effect_errors_total", "Failed side effects", ["effect"],
                                          registry=r)
        # kafka:// (or a full disk on file://): appends the event log did not acknowledge. A write RPC counts
        # one per UNAVAILABLE answer; GetFeed counts one per page whose exposures failed every retry.
        self.ranking_cache_bytes = Gauge("feedrank_ranking_cache_bytes", "Bytes held by the ranking cache (cursor "
                                         "pages, refreshes); bounded by serving.ranking_cache_mb", registry=r)
        self.ranking_cache_evictions = Counter("feedrank_ranking_cache_evictions", "Rankings evicted from the ranking "
                                             "cache since start (least recently used first)", registry=r)
        self.signals = Counter("feedrank_signals_total", "SubmitSignals signals by outcome (accepted, not_served, "
                               "repeated, unvalidated: accepted while Redis was unavailable)", ["outcome"], registry=r)
        self.event_log_errors = Counter("feedrank_event_log_errors_total",
                                        "Event log appends that failed (not acknowledged)", ["rpc"], registry=r)
        self.side_effect_retries = Counter("feedrank_side_effect_retries_total",
                                           "Side effect attempts retried after an event log error", ["effect"],
                                           registry=r)
        self.exposures_unlogged = Counter("feedrank_exposures_unlogged_total",
                                          "Exposure events not written after every retry (or not queued)",
                                          registry=r)
        self.exposures_without_features = Counter(
            "feedrank_exposures_without_features_total",
            "Exposures logged without their served feature rows (pages ranked without the heavy ranker)", registry=r)
        self.shadow_active = Gauge("feedrank_shadow_active", "1 while a shadow heavy candidate scores HOME pages",
                                   registry=r)
        self.shadow_pages = Counter("feedrank_shadow_pages_scored_total", "Served pages scored by the shadow candidate",
                                    registry=r)
        self.served_records = Counter("feedrank_served_records_total", "Served pages recorded for DebugRanking by "
                                      "request id (serving.served)", registry=r)
        self.shadow_decisions = Gauge("feedrank_shadow_decisions", "Shadow decisions recorded in Redis, by decision "
                                      "(promote, reject): models.shadow", ["decision"], registry=r)
        self.models_refused = Gauge("feedrank_models_refused", "Versions the store made current that this server "
                                    "refused to load (feature schema mismatch); the previous one serves", ["model"],
                                    registry=r)
        self._versions: dict[str, str] = {}
        self.jobs = StreamJobsCollector()
        r.register(self.jobs)

    def set_models(self, versions: dict[str, str]) -> None:
        for model, v in versions.items():
            old = self._versions.get(model)
            if old == v:
                continue
            if old is not None:
                with warnings.catch_warnings():  # a warning keyed on Feast's env var: values are in-process
                    warnings.filterwarnings("ignore", "Removal of labels", UserWarning)  # (core/__init__.py)
                    self.model.remove(model, old)
            self.model.labels(model, v).set(1)
            self._versions[model] = v

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


LEARNER_DECISIONS = ("promoted", "rejected", "rolled_back", "rebased", "superseded")


class StreamJobsCollector:
    """The streaming jobs' own progress counters (their Redis hash ``feedrank:jobs:<job>:progress``, which the
    server reads every few seconds: :meth:`update`) as metrics, so one scrape of a replica shows the
    feature job's throughput and freshness and the online learner's decisions beside the serving ones."""

    def __init__(self) -> None:
        self.progress: dict[str, dict[str, Any]] = {}
        self.now_ms = 0        # the serving clock (event time) when read
        self.wall_ms = 0

    def update(self, progress: dict[str, dict[str, Any]], now_ms: int, wall_ms: int) -> None:
        self.progress, self.now_ms, self.wall_ms = progress, now_ms, wall_ms

    def collect(self) -> Iterator[Any]:
        events = CounterMetricFamily("feedrank_stream_events", "Events the feature job applied, per view (its count)",
                                     labels=["stream", "view"])
        fresh = GaugeMetricFamily("feedrank_stream_freshness_seconds", "The serving clock minus the newest event "
                                  "time the feature job applied, per view (grows while no events arrive)",
                                  labels=["stream", "view"])
        flushed = GaugeMetricFamily("feedrank_stream_flush_age_seconds", "Seconds since the feature job last wrote "
                                    "a view to the online store", labels=["stream", "view"])
        features = self.progress.get("features", {})
        for key, v in features.items():
            view = key[: -len("_events")] if key.endswith("_events") and not key.startswith("dedupe_") else None
            if view is None or not isinstance(v, float):
                continue
            events.add_metric(["features", view], v)
            max_ts, at = features.get(f"{view}_max_ts"), features.get(f"{view}_flushed_at_ms")
            if isinstance(max_ts, float) and max_ts > 0:
                fresh.add_metric(["features", view], max(self.now_ms - max_ts, 0) / 1000)
            if isinstance(at, float) and at > 0:
                flushed.add_metric(["features", view], max(self.wall_ms - at, 0) / 1000)
        decisions = CounterMetricFamily("feedrank_learner_decisions", "The online learner's decisions (promoted, "
                                        "rejected, rolled_back, rebased, superseded)", labels=["decision"])
        examples = CounterMetricFamily("feedrank_learner_examples", "Examples the online learner trained on")
        learner = self.progress.get("learner", {})
        for d in LEARNER_DECISIONS:
            if isinstance(learner.get(d), float):
                decisions.add_metric([d], learner[d])
        if isinstance(learner.get("examples"), float):
            examples.add_metric([], learner["examples"])
        yield from (events, fresh, flushed, decisions, examples)
