"""Configuration: loaded and validated in one place.

Defaults live only in ``feedrank.toml`` at the project root (the models below declare
types and bounds, never defaults), so the file is the single documentation of every
default. ``FEEDRANK_CONFIG`` names a file merged on top; ``FEEDRANK_<SECTION>_<KEY>``
environment variables override single keys. Anything invalid raises
:class:`ConfigError` naming the key and the reason, before any service starts.
"""

from __future__ import annotations

import json
import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_FILE = PROJECT_ROOT / "feedrank.toml"
ENV_PREFIX = "FEEDRANK_"
#: Environment variables that are not key overrides.
ENV_SPECIAL = {"FEEDRANK_CONFIG", "FEEDRANK_HOME"}
#: Short names for the most-changed keys.
ENV_SHORTHANDS = {
    "FEEDRANK_EVENTS": ("events", "uri"),
    "FEEDRANK_REDIS": ("redis", "uri"),
    "FEEDRANK_MODEL_STORE": ("model_store", "uri"),
}

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Port = Annotated[int, Field(gt=0, lt=65536)]


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    data_dir: str


class Redis(_Section):
    uri: str
    binary: str
    maxmemory: str
    maxmemory_policy: Literal["noeviction", "volatile-lru", "allkeys-lru", "volatile-ttl"]
    appendonly: bool
    startup_timeout_s: PosFloat

    @field_validator("uri")
    @classmethod
    def _redis_uri(cls, v: str) -> str:
        if not v.startswith(("redis://", "unix://")):
            raise ValueError("must start with redis:// or unix://")
        return v


class Events(_Section):
    uri: str
    rotate_ms: PosInt
    rotate_events: PosInt
    fsync: bool
    orphan_seal_ms: PosInt
    bundle_events: PosInt
    kafka_partitions: PosInt
    kafka_replication_factor: PosInt
    kafka_delivery_timeout_ms: PosInt
    kafka_linger_ms: NonNegInt
    kafka_source_idle_ms: NonNegInt
    kafka_retention_ms: Annotated[int, Field(ge=-1)]
    flink_connector_jar: str

    @field_validator("uri")
    @classmethod
    def _events_uri(cls, v: str) -> str:
        if v.startswith("file://"):
            if not v[len("file://"):]:
                raise ValueError("file:// needs a directory, e.g. file://var/events")
            return v
        if v.startswith("kafka://"):
            from urllib.parse import urlparse

            u = urlparse(v)
            if not u.hostname or not u.port or not u.path.strip("/"):
                raise ValueError("kafka:// needs host, port and topic: kafka://127.0.0.1:9092/engagements")
            return v
        raise ValueError("must be file://<dir> or kafka://host:port/topic")


class Jvm(_Section):
    dir: str
    maven: str


class Kafka(_Section):
    controller_port: Annotated[int, Field(ge=0, lt=65536)]
    heap: str
    retention_hours: Annotated[int, Field(ge=-1)]
    startup_timeout_s: PosFloat


class Flink(_Section):
    rest_port: Port
    rpc_port: Port
    parallelism: PosInt
    taskmanagers: PosInt
    taskmanager_slots: PosInt
    jobmanager_memory: str
    taskmanager_memory: str
    python_execution_mode: Literal["thread", "process"]
    checkpoint_interval_ms: PosInt
    file_monitor_interval_ms: PosInt
    startup_timeout_s: PosFloat
    task_cancellation_timeout_s: PosFloat


class Lake(_Section):
    uri: str
    partition_commit_delay_s: NonNegInt
    compact_min_age_s: NonNegInt
    negatives_per_positive: PosFloat
    attribution_window_s: PosInt
    validation_fraction: Fraction
    interest_days: PosInt

    @field_validator("uri")
    @classmethod
    def _lake_uri(cls, v: str) -> str:
        if not v.startswith("file://") or not v[len("file://"):]:
            raise ValueError("must be file://<dir> (e.g. file://var/lake)")
        return v


class Shadow(_Section):
    window_s: PosInt
    min_pages: PosInt
    min_positives: PosInt
    auc_tolerance: Annotated[float, Field(ge=0, le=1)]
    ndcg_tolerance: Annotated[float, Field(ge=0, le=1)]
    ndcg_k: PosInt


class ModelStore(_Section):
    uri: str
    retention_hours: PosFloat
    retention_versions: PosInt
    retention_online_versions: PosInt
    poll_interval_s: PosFloat


class Candidates(_Section):
    follow_max: PosInt
    ann_k: PosInt
    trending_k: NonNegInt
    cache_size: PosInt
    cache_ttl_s: PosInt
    celebrity_followers: PosInt
    source_timeout_ms: PosInt
    follow_window_h: PosFloat
    unfollow_exclusion_h: PosFloat
    trending_window_h: PosFloat
    ad_inventory: NonNegInt
    ads_per_request: NonNegInt


class Retrieval(_Section):
    dim: PosInt
    index: Literal["ivf", "ivf_fp16", "ivf_sq8", "flat"]
    nlist: PosInt
    nprobe: PosInt


class Training(_Section):
    two_tower_epochs: PosInt
    two_tower_author_dim: PosInt
    heavy_rows: PosInt
    heavy_epochs: PosInt
    heavy_masked: list[str]
    heavy_feature_clip: PosFloat


class Funnel(_Section):
    light_k: PosInt
    heavy_k: PosInt
    page_size: PosInt

    @model_validator(mode="after")
    def _narrowing(self) -> "Funnel":
        if not self.light_k >= self.heavy_k >= self.page_size:
            raise ValueError("funnel sizes must narrow: light_k >= heavy_k >= page_size")
        return self


class Heads(_Section):
    click: float
    like: float
    comment: float
    share: float
    long_dwell: float
    negative: Annotated[float, Field(lt=0)]
    long_dwell_ms: PosInt

    def weights(self) -> dict[str, float]:
        """Head name -> weight, in the heavy ranker's head order."""
        return {h: getattr(self, h) for h in HEAD_NAMES}


HEAD_NAMES = ("click", "like", "comment", "share", "long_dwell", "negative")


class Rerank(_Section):
    max_consecutive_author: PosInt
    min_out_of_network: Fraction
    ad_every: NonNegInt
    fresh_fraction: Fraction
    fresh_hours: PosFloat
    policy_demotion: Fraction
    remove_policy_flagged: bool
    original_boost: Annotated[float, Field(ge=1.0)]
    fatigue_half_life_hours: PosFloat
    fatigue_strength: Fraction
    author_diversity_decay: Annotated[float, Field(gt=0, le=1)]
    author_diversity_floor: Fraction
    explore_slots: NonNegInt
    cold_start_impressions: NonNegInt


class Serving(_Section):
    host: str
    port: Port
    workers: PosInt
    max_concurrent_rpcs: PosInt
    metrics_port: Port
    http_port: Annotated[int, Field(ge=0, lt=65536)]  # 0 = no HTTP API
    tls_cert: str
    tls_key: str
    tls_ca: str
    otlp_endpoint: str
    otlp_service_name: str
    jwt_secret: Annotated[str, Field(min_length=8)]  # the shipped placeholder is refused at start (serving.edge)
    jwt_public_key: str
    jwt_jwks_url: str
    jwt_jwks_cache_s: PosInt
    jwt_issuer: str
    jwt_audience: str
    jwt_max_lifetime_s: PosInt
    cursor_secret: Annotated[str, Field(min_length=8)]
    rate_limit_rps: PosFloat
    rate_limit_burst: PosInt
    result_cache_ttl_s: NonNegInt
    ranking_ttl_s: PosInt
    max_queued_ms: Annotated[float, Field(ge=0)]
    feature_refresh_ms: PosInt
    snapshot_ttl_s: PosInt
    served_record_ttl_s: PosInt
    malloc_arenas: NonNegInt
    request_deadline_ms: PosInt
    experiments_file: str
    exposure_log_attempts: PosInt
    exposure_log_backoff_s: Annotated[float, Field(ge=0)]
    id_headroom: PosInt
    max_feedback_entries: PosInt
    ranking_cache_mb: PosInt
    signal_window_s: PosInt
    signal_rate_limit_rps: PosFloat
    signal_rate_limit_burst: PosInt
    max_text_chars: PosInt
    max_request_id_chars: PosInt


class Streaming(_Section):
    flush_ms: PosInt
    max_buffer_rows: PosInt
    dedupe_retention_s: PosFloat
    key_shards: PosInt
    state_cache_rows: PosInt
    gc_young_threshold: PosInt
    out_of_orderness_ms: NonNegInt
    change_stream_maxlen: PosInt
    bootstrap_world: str
    restart_attempts: NonNegInt


class OnlineLearning(_Section):
    lr: PosFloat
    lr_cap: PosFloat
    grad_clip: PosFloat
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)]
    batch_size: PosInt
    validate_every_s: PosFloat
    max_auc_drop: Fraction
    max_logloss_increase: PosFloat
    min_logloss_improvement: Fraction
    label_drift_z: PosFloat
    label_drift_ratio: Annotated[float, Field(gt=1)]
    promotion_z: Annotated[float, Field(ge=0)]
    rollback_ctr_drop: Fraction
    rollback_window_s: PosFloat
    rollback_min_exposures: PosInt
    attribution_window_s: PosFloat
    holdout_window_s: PosFloat
    min_holdout: PosInt
    min_holdout_positives: PosInt

    @model_validator(mode="after")
    def _lr_capped(self) -> "OnlineLearning":
        if self.lr > self.lr_cap:
            raise ValueError(f"lr {self.lr} exceeds lr_cap {self.lr_cap}")
        return self


class TrendShift(_Section):
    topic: NonNegInt
    at_day: Annotated[float, Field(ge=0)]
    boost: float


class Scale(_Section):
    users: PosInt
    creators: PosInt
    posts: PosInt
    impressions: PosInt

    @model_validator(mode="after")
    def _creators_are_users(self) -> "Scale":
        if self.creators > self.users:
            raise ValueError("creators must not exceed users (creators are users who post)")
        return self


class Sim(_Section):
    seed: NonNegInt
    scale: str
    topics: Annotated[int, Field(ge=2)]
    vocab_per_topic: PosInt
    words_per_post: tuple[PosInt, PosInt]
    days: PosFloat
    start: str
    repost_rate: Fraction
    policy_flag_rate: Fraction
    celebrities: PosInt
    celebrity_reach: tuple[Fraction, Fraction]
    follow_zipf: PosFloat
    examination_eta: PosFloat
    session_length: PosInt
    candidates_per_session: PosInt
    trend_shifts: list[TrendShift]
    scales: dict[str, Scale]

    @model_validator(mode="after")
    def _consistent(self) -> "Sim":
        if self.scale not in self.scales:
            raise ValueError(f"scale {self.scale!r} is not one of {sorted(self.scales)}")
        if self.words_per_post[0] > self.words_per_post[1]:
            raise ValueError("words_per_post must be [min, max]")
        if self.celebrity_reach[0] > self.celebrity_reach[1]:
            raise ValueError("celebrity_reach must be [min, max]")
        if self.candidates_per_session < self.session_length:
            raise ValueError("candidates_per_session must be >= session_length")
        for s in self.trend_shifts:
            if s.topic >= self.topics:
                raise ValueError(f"trend shift topic {s.topic} >= topics {self.topics}")
        return self


class Clients(_Section):
    session_gap_s: PosFloat
    continue_prob: Fraction
    follow_prob: Fraction
    publish_per_min: Annotated[float, Field(ge=0)]


class K8s(_Section):
    namespace: str
    image: str
    flink_image: str
    flink_version: str
    flink_python_jar: str
    flink_parallelism: PosInt
    flink_taskmanager_memory: str
    checkpoint_uri: str
    model_store_uri: str
    lake_uri: str
    secret: str
    serving_replicas: PosInt
    serving_max_replicas: PosInt
    serving_cpu_target_percent: Annotated[int, Field(gt=0, le=100)]
    serving_cpu: str
    serving_memory: str
    redis_image: str
    redis_memory: str
    redis_storage: str
    kafka_version: str
    kafka_brokers: PosInt
    kafka_partitions: PosInt
    kafka_storage: str
    daily_schedule: str
    batch_memory: str
    k8s_version: str


class Config(_Section):
    """The whole configuration. ``root`` is where relative paths are resolved."""

    root: Path
    paths: Paths
    redis: Redis
    events: Events
    jvm: Jvm
    kafka: Kafka
    flink: Flink
    model_store: ModelStore
    lake: Lake
    shadow: Shadow
    candidates: Candidates
    retrieval: Retrieval
    training: Training
    funnel: Funnel
    heads: Heads
    rerank: Rerank
    serving: Serving
    streaming: Streaming
    online_learning: OnlineLearning
    sim: Sim
    clients: Clients
    k8s: K8s

    def path(self, p: str | Path) -> Path:
        """Resolve a configured path relative to the project root."""
        p = Path(p)
        return p if p.is_absolute() else (self.root / p)

    @property
    def data_dir(self) -> Path:
        return self.path(self.paths.data_dir)

    def resolve_uri(self, uri: str) -> str:
        """Make file:// URIs absolute (``file://var/x`` is relative to the project root)."""
        if uri.startswith("file://"):
            return "file://" + str(self.path(uri[len("file://"):]))
        return uri


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaf_paths(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """ENV name -> key path, for every leaf of the defaults."""
    out: dict[str, tuple[str, ...]] = {}
    for k, v in d.items():
        path = prefix + (k,)
        if isinstance(v, dict):
            out.update(_leaf_paths(v, path))
        else:
            out[ENV_PREFIX + "_".join(path).upper()] = path
    return out


def _env_value(raw: str, default: Any) -> Any:
    if isinstance(default, (list, dict)):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"expects JSON for a list/table value: {e}") from None
    if isinstance(default, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expects a boolean, got {raw!r}")
    return raw  # pydantic coerces numbers and checks them


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(env: dict[str, str] | None = None, defaults_file: Path = DEFAULTS_FILE) -> Config:
    """Load defaults, the FEEDRANK_CONFIG file and FEEDRANK_* overrides; validate all of it."""
    env = dict(os.environ if env is None else env)
    data = _read_toml(defaults_file)
    leaves = _leaf_paths(data)
    origin: dict[tuple[str, ...], str] = {}
    if env.get("FEEDRANK_CONFIG"):
        extra_file = Path(env["FEEDRANK_CONFIG"])
        data = _merge(data, _read_toml(extra_file))
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_SPECIAL:
            continue
        path = ENV_SHORTHANDS.get(name) or leaves.get(name)
        if path is None:
            # Keys under tables of tables (e.g. a new sim scale) are not enumerable; be strict.
            raise ConfigError(f"{name}: unknown setting (see feedrank.toml for the keys)")
        default: Any = data
        for k in path:
            default = default[k]
        try:
            _set(data, path, _env_value(raw, default))
        except ConfigError as e:
            raise ConfigError(f"{name} ({'.'.join(path)}): {e}") from None
        origin[path] = name
    data["root"] = str(defaults_file.resolve().parent)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin)) from None


def _explain(e: ValidationError, origin: dict[tuple[str, ...], str]) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(str(x) for x in err["loc"])
        key = ".".join(loc)
        src = next((f" (from {v})" for p, v in origin.items() if loc[: len(p)] == p), "")
        lines.append(f"{key}{src}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)


@lru_cache(maxsize=1)
def get_config() -> Config:
    """Process-wide configuration (loaded once)."""
    return load_config()
