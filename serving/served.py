"""Served records: what each served page showed and why, kept by request id, so DebugRanking explains
a post *as it was served* long after its ranking left the cache.

The ranking cache keeps a ranking ``serving.ranking_ttl_s`` (for cursor pages) and the Redis snapshot of
its feature rows ``serving.snapshot_ttl_s`` (for the online learner); neither answers "why was this post
at position 3 yesterday". Every served page writes one compact record (~3 KB for 20 items) under its
request id for ``serving.served_record_ttl_s``: per item its source, ANN cosine, light score and rank,
heavy score and rank, head scores, final score, its place by score alone and the re-rank rules that
placed it; per page the funnel's stage counts (when the page's request ranked), head weights, model
version, experiments and degraded reasons. The feature rows are not copied again: they are read from
the lake's ``features_served`` table (exact float32, found by the page's snapshot id in its hour's
partition) or, before the lake job has archived them, from the Redis snapshot (float16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.config import Config
from core.schema import HEAD_NAMES, HEAVY_NAMES, HEAVY_SCHEMA_HASH
from serving.components import SOURCE_NAMES, Candidates, Query

KEY = "feedrank:served:{}"  # request id -> hash: first position of each served page -> its JSON record

# the per-item columns a record keeps (name in the record, candidate column): written by the funnel's stages
ITEM_COLUMNS = (("ann", "ann"), ("light_score", "light_score"), ("light_rank", "rank_by_light_score"),
                ("heavy_score", "heavy_score"), ("heavy_rank", "rank_by_score"), ("score", "score"),
                ("score_order", "score_order"))


class NotServed(LookupError):
    """The request id has no served record (never served, or older than serving.served_record_ttl_s), or
    the post was not on any page it served."""


def page_record(query: Query, page: Candidates, snapshot_id: str | None) -> dict[str, Any]:
    """One served page as the JSON-able record :class:`ServedRecords` keeps (column by column: it runs for
    every page served)."""
    cols: dict[str, list[Any]] = {"post_id": page.ids.tolist(), "position": page["position"].tolist(),
                                  "source": [SOURCE_NAMES[s] for s in page.source.tolist()]}
    for name, col in ITEM_COLUMNS:
        if col in page:
            v = page[col]
            cols[name] = v.tolist() if np.issubdtype(v.dtype, np.integer) else np.round(v.astype(np.float64), 7).tolist()
    if "heads" in page:
        cols["heads"] = np.round(page["heads"].astype(np.float64), 7).tolist()
    if "reasons" in page:
        cols["reasons"] = [list(r) for r in page["reasons"]]
    names = list(cols)
    items = [dict(zip(names, row)) for row in zip(*cols.values())]
    return {"request_id": query.request_id, "user_id": query.user_id, "feed_type": query.feed_type,
            "served_ms": query.now_ms, "pipeline": query.pipeline or "PAGE", "model_version": query.model_version,
            "experiments": dict(query.experiments), "degraded": list(query.degraded),
            "head_weights": [float(w) for w in query.params.head_weights], "snapshot_id": snapshot_id,
            "funnel": [list(f) for f in query.funnel], "items": items}


class ServedRecords:
    """The records in Redis: one hash per request id, one field per served page (cursor pages and refreshes
    of the same ranking add theirs), expiring ``serving.served_record_ttl_s`` after the latest page."""

    def __init__(self, cfg: Config):
        self.ttl_s = int(cfg.serving.served_record_ttl_s)

    def put(self, client: Any, record: dict[str, Any]) -> None:
        key = KEY.format(record["request_id"])
        first = record["items"][0]["position"] if record["items"] else 0
        with client.pipeline(transaction=False) as pipe:
            pipe.hset(key, str(first), json.dumps(record, separators=(",", ":")))
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def pages(self, client: Any, request_id: str) -> list[dict[str, Any]]:
        """Every page served under ``request_id``, first position first."""
        raw = client.hgetall(KEY.format(request_id))
        return sorted((json.loads(v) for v in raw.values()), key=lambda r: r["items"][0]["position"] if r["items"] else 0)


@dataclass
class ServedExplanation:
    """One served post: its page record, its item, and the features it was served with."""

    request_id: str
    page: dict[str, Any]            # the page record that served it
    item: dict[str, Any]
    funnel: list[list[Any]]         # the ranking's stage counts (from the page that ranked, for a cursor page)
    features: np.ndarray | None     # the served heavy-feature row, or None when neither store has it
    features_from: str              # lake | snapshot | unavailable
    rescored: np.ndarray | None = None  # P(head) of the served model on those features (equal to item heads)
    notes: list[str] = field(default_factory=list)


def find(pages: list[dict[str, Any]], request_id: str, user_id: int, post_id: int) -> tuple[dict, dict, list]:
    """The page and item of ``post_id`` among a request's served pages, and the ranking's funnel counts."""
    if not pages:
        raise NotServed(f"request {request_id} has no served record (never served, or older than "
                        f"serving.served_record_ttl_s)")
    if pages[0]["user_id"] != user_id:
        raise NotServed(f"request {request_id} served another user, not user {user_id}")
    funnel: list[list[Any]] = []
    for page in pages:
        funnel = page["funnel"] or funnel  # a plain cursor page ranked nothing: the ranking's counts are earlier
        for item in page["items"]:
            if item["post_id"] == post_id:
                return page, item, funnel
    shown = ", ".join(f"{p['items'][0]['position']}-{p['items'][-1]['position']}" for p in pages if p["items"])
    raise NotServed(f"post {post_id} was not served by request {request_id} (it served positions {shown})")


def served_row(cfg: Config, snapshots: Any, redis: Any, page: dict[str, Any], post_id: int,
               notes: list[str]) -> tuple[np.ndarray | None, str]:
    """The heavy-feature row ``post_id`` was served with: the lake's exact float32 row when the lake job has
    archived the page, else the Redis snapshot's float16 row while it lives, else None (``notes`` says why
    a store could not be read)."""
    from features import lake

    sid = page.get("snapshot_id")
    if not sid:
        notes.append("served without feature rows (a degraded ranking)")
        return None, "unavailable"
    try:
        got = lake.served_rows(cfg, sid, int(page["served_ms"]))
    except Exception as e:  # noqa: BLE001 - an unreadable lake leaves the snapshot; the answer says so
        notes.append(f"lake not readable: {type(e).__name__}: {e}")
        got = None
    if got is not None:
        ids, rows, schema = got
        hit = np.flatnonzero(ids == post_id)
        if hit.size and schema == HEAVY_SCHEMA_HASH and rows.shape[1] == len(HEAVY_NAMES):
            return rows[hit[0]], "lake"
    try:
        snap = redis.run(lambda r: snapshots.get_many([sid])).get(sid)
    except Exception as e:  # noqa: BLE001 - Redis down: the explanation says the features are unavailable
        notes.append(f"snapshot not readable: {type(e).__name__}: {e}")
        snap = None
    if snap is not None:
        ids, rows = snap
        hit = np.flatnonzero(ids == post_id)
        if hit.size and rows.shape[1] == len(HEAVY_NAMES):
            return rows[hit[0]], "snapshot"
    return None, "unavailable"


def weighted(item: dict[str, Any], head_weights: list[float]) -> dict[str, float]:
    """The item's score as a sum of parts: weight x P(head) per head, and what the adjustments (fatigue,
    policy demotion, original boost, author diversity) changed; an ad's score is bid x P(click)."""
    if "heads" not in item:
        return {}
    if item["source"] == "ad":
        return {"bid_x_click": float(item.get("score", 0.0))}
    parts = {h: float(w) * float(p) for h, w, p in zip(HEAD_NAMES, head_weights, item["heads"])}
    if "heavy_score" in item and "score" in item:
        parts["adjustments"] = float(item["score"]) - float(item["heavy_score"])
    return parts


def journey(item: dict[str, Any], funnel: list[list[Any]]) -> list[dict[str, Any]]:
    """A served item's path through the funnel, stage by stage, from its record and the ranking's counts
    (the same rows DebugRanking traces for a fresh ranking)."""
    rows: list[dict[str, Any]] = []

    def row(stage: str, decision: str, score: float = 0.0, rank: int = 0, of: int = 0, detail: str = "") -> None:
        rows.append({"stage": stage, "decision": decision, "score": float(score), "rank": int(rank), "of": int(of),
                     "detail": detail})

    for stage, n_in, n_out in funnel:
        if stage.startswith("source:"):
            continue
        if stage == "sources":
            row("sources", "retrieved", item.get("ann", 0.0), 0, n_out,
                f"source {item['source']}; ANN cosine {item.get('ann', 0.0):.3f}; {n_in} retrieved, {n_out} after "
                f"duplicates merged")
        elif stage.startswith("filter:"):
            row(stage, "kept", 0.0, 0, n_in, f"{n_in - n_out} of {n_in} removed")
        elif stage == "TopKSelector(light_score)":
            row("LightRankerScorer", "scored", item.get("light_score", 0.0), item.get("light_rank", 0), n_in)
            row(stage, "selected", item.get("light_score", 0.0), item.get("light_rank", 0), n_in, f"{n_out} kept")
        elif stage == "TopKSelector(score)":
            heavy, final = item.get("heavy_score"), item.get("score", 0.0)
            if heavy is not None:
                row("HeavyRankerScorer", "scored", heavy, 0, n_in, "weighted sum of the head scores")
                if abs(final - heavy) > 1e-7:
                    row("adjustments", "adjusted", final, 0, n_in, f"{heavy:.5f} -> {final:.5f}")
            row(stage, "selected", final, item.get("heavy_rank", 0), n_in, f"{n_out} kept")
        elif stage == "RerankSelector":
            reasons = item.get("reasons") or []
            by_score = item.get("score_order", 0)
            moved = f"by score alone #{by_score}" + (f", placed by {', '.join(reasons)}" if reasons else "")
            row(stage, "selected", item.get("score", 0.0), item["position"], n_in, moved)
        else:
            row(stage, "selected", item.get("score", 0.0), item["position"] if stage.endswith("Selector") else 0,
                n_in, f"{n_out} kept")
    return rows
