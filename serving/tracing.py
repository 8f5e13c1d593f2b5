"""OpenTelemetry traces of a request across the funnel: one span per RPC (``feedrank.<Rpc>``), and
under it the pipeline (``pipeline:<NAME>``), the query hydrators, each candidate source (run in the
source pool, parented to the request's span), the filters and every hydrator, scorer and selector,
with the candidate counts in and out.

``opentelemetry-api`` is a no-op until a tracer provider is installed: :func:`configure` installs the
SDK with an OTLP/HTTP exporter when ``serving.otlp_endpoint`` is set; tests install their own
(an in-memory exporter). Spans cost a few microseconds each when nothing records them.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

log = logging.getLogger("feedrank.serving.tracing")
tracer = trace.get_tracer("feedrank.serving")


def configure(cfg: Any) -> bool:
    """Export spans over OTLP/HTTP to ``serving.otlp_endpoint`` (e.g. http://127.0.0.1:4318/v1/traces) when
    it is set; True when a provider was installed."""
    endpoint = cfg.serving.otlp_endpoint
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": cfg.serving.otlp_service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s", endpoint)
    return True
