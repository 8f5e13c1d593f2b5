"""Job progress counters in Redis: the streaming jobs write them (:meth:`features.writer.FeatureWriter.progress`),
the CLI, the lab and job supervision read them."""

from __future__ import annotations

from typing import Any

from core.config import Config
from features.connection import redis_client

PROGRESS_KEY = "feedrank:jobs:{job}:progress"


def read_progress(cfg: Config, job: str, client: Any = None) -> dict[str, Any]:
    """A job's progress counters (numbers as floats; anything else, e.g. a model version, as text), read with
    ``client`` (default: a new connection to cfg's Redis)."""
    raw = (client or redis_client(cfg)).hgetall(PROGRESS_KEY.format(job=job))
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k.decode()] = float(v)
        except ValueError:
            out[k.decode()] = v.decode()
    return out
