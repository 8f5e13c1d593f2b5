"""A/B experiments: a TOML file of experiments, users assigned by consistent hashing.

Each experiment hashes ``"<salt>:<user_id>"`` (SHA-256) into ``BUCKETS`` buckets; its
variants own contiguous bucket ranges in proportion to their weights. Assignment is
therefore stable across replicas and restarts, independent between experiments (each
has its own salt), and changes for a user only when that experiment's salt or weights
change. A variant may override the heavy model version, head weights and any re-rank
rule. Experiments apply in file order; where two override the same key the later wins.
Any number of experiments can run at once (assignment is O(experiments) hashing, ~1 us each).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import HEAD_NAMES, Config, ConfigError, Rerank

BUCKETS = 10_000
# what `feedrank experiments report` reads out per variant, and what a guardrail may bound
READOUT_METRICS = ("ctr", "like_rate", "comment_rate", "share_rate", "long_dwell_rate", "negative_rate", "session_depth")


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    weight: float = Field(gt=0)
    model_version: str = ""                       # pin the heavy ranker to this version ("" = current)
    heads: dict[str, float] = Field(default_factory=dict)
    rerank: dict[str, Any] = Field(default_factory=dict)

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - set(HEAD_NAMES)
        if bad:
            raise ValueError(f"unknown head(s) {sorted(bad)}; heads are {list(HEAD_NAMES)}")
        if v.get("negative", -1.0) >= 0:
            raise ValueError("the negative head must weigh < 0")
        return v

    @field_validator("rerank")
    @classmethod
    def _rerank(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = set(v) - set(Rerank.model_fields)
        if bad:
            raise ValueError(f"unknown re-rank rule(s) {sorted(bad)}; rules are {sorted(Rerank.model_fields)}")
        return v


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    salt: str = ""
    enabled: bool = True
    variants: list[Variant] = Field(min_length=1)
    # read-out metric -> the largest relative change vs control a variant may show (negative: the largest fall),
    # flagged by `feedrank experiments report` when a significant change crosses it
    guardrails: dict[str, float] = Field(default_factory=dict)

    @field_validator("guardrails")
    @classmethod
    def _guardrails(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - set(READOUT_METRICS)
        if bad:
            raise ValueError(f"unknown guardrail metric(s) {sorted(bad)}; metrics are {list(READOUT_METRICS)}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> "Experiment":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name}: duplicate variant names")
        return self

    def bucket(self, user_id: int) -> int:
        h = hashlib.sha256(f"{self.salt or self.name}:{user_id}".encode()).digest()
        return int.from_bytes(h[:8], "big") % BUCKETS

    def assign(self, user_id: int) -> Variant:
        b = self.bucket(user_id)
        total = sum(v.weight for v in self.variants)
        edge = 0.0
        for v in self.variants:
            edge += v.weight / total * BUCKETS
            if b < edge:
                return v
        return self.variants[-1]


@dataclass(frozen=True)
class Params:
    """The settings one request runs with: the config's, overridden by the user's variants."""

    head_weights: tuple[float, ...]
    rerank: Rerank
    heavy_version: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


class Experiments:
    def __init__(self, experiments: list[Experiment]):
        names = [e.name for e in experiments]
        if len(set(names)) != len(names):
            raise ConfigError("experiments: duplicate experiment names")
        self.experiments = [e for e in experiments if e.enabled]

    @classmethod
    def load(cls, path: str | Path) -> "Experiments":
        """Read the file; a missing file means no experiments, an invalid one is a ConfigError with the reason."""
        p = Path(path)
        if not p.exists():
            return cls([])
        try:
            data = tomllib.loads(p.read_text())
            return cls([Experiment.model_validate(e) for e in data.get("experiments", [])])
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except ValidationError as e:
            raise ConfigError(f"{p}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None

    def assign(self, user_id: int) -> dict[str, str]:
        return {e.name: e.assign(user_id).name for e in self.experiments}

    def check(self, cfg: Config) -> "Experiments":
        """Validate every variant's re-rank overrides against the config's bounds (at start-up)."""
        for e in self.experiments:
            for v in e.variants:
                if v.rerank:
                    try:
                        Rerank.model_validate({**cfg.rerank.model_dump(), **v.rerank})
                    except ValidationError as err:
                        raise ConfigError(f"experiment {e.name} variant {v.name}: " + "; ".join(
                            f"rerank.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in err.errors())) from None
        return self

    def params(self, cfg: Config, user_id: int) -> tuple[Params, dict[str, str]]:
        heads = cfg.heads.weights()
        rerank: dict[str, Any] = {}
        version = ""
        assigned: dict[str, str] = {}
        for e in self.experiments:
            v = e.assign(user_id)
            assigned[e.name] = v.name
            heads.update(v.heads)
            rerank.update(v.rerank)
            version = v.model_version or version
        rr = cfg.rerank.model_copy(update=rerank) if rerank else cfg.rerank  # bounds checked at start-up (check)
        return Params(tuple(heads[h] for h in HEAD_NAMES), rr, version, {"rerank": rerank}), assigned
