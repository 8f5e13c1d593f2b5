"""The Redis connection of the feature tier (the Feast online store, change streams, job progress)."""

from __future__ import annotations

from typing import Any

from core.config import Config


def redis_client(cfg: Config) -> Any:
    import redis

    return redis.Redis.from_url(cfg.redis.uri)
