"""Ranked candidates -> the protobuf responses (feed items with their reasons, DebugRanking)."""

from __future__ import annotations

from typing import Any

from core.schema import HEAD_NAMES, HEAVY_NAMES
from core.units import HOUR_MS
from serving.components import AD, IN_NETWORK, OUT_OF_NETWORK, TRENDING, Candidates, Query
from serving.protos import pb
from serving.state import ServingState

SOURCE_REASONS = {IN_NETWORK: "followed_author", OUT_OF_NETWORK: "interest_match", AD: "sponsored",
                  TRENDING: "trending"}


def feed_items(page: Candidates, state: ServingState) -> list[Any]:
    """FeedItems: the source's reason first, "fresh" within ``rerank.fresh_hours``, then the re-ranker's."""
    out = []
    heads = page["heads"] if "heads" in page else None
    reasons = page["reasons"] if "reasons" in page else None
    authors = state.catalog.author[page.ids]
    fresh_ms = state.cfg.rerank.fresh_hours * HOUR_MS
    now = state.clock()
    for i in range(len(page)):
        src = int(page.source[i])
        why = [SOURCE_REASONS.get(src, "candidate")]
        if now - state.catalog.published_ms[page.ids[i]] <= fresh_ms:
            why.append("fresh")
        if reasons is not None:
            why += [r for r in reasons[i] if r not in why]
        hs = pb.HeadScores(**{h: float(heads[i, j]) for j, h in enumerate(HEAD_NAMES)}) if heads is not None else None
        out.append(pb.FeedItem(post_id=int(page.ids[i]), author_id=int(authors[i]),
                               score=float(page["score"][i]) if "score" in page else 0.0, heads=hs, source=src,
                               position=int(page["position"][i]), reasons=why))
    return out


def debug_response(query: Query, post: int, ranked: Candidates, one: Candidates) -> Any:
    i = ranked.index_of(post)
    stages = [pb.StageDecision(stage=t["stage"], decision=t["decision"], score=t["score"], rank=t["rank"],
                               of=t["of"], detail=t["detail"]) for t in query.trace]
    return pb.DebugRankingResponse(
        post_id=post, served=i is not None and i < query.limit,
        position=int(ranked["position"][i]) if i is not None else 0,
        features={n: float(v) for n, v in zip(HEAVY_NAMES, one["x"][0])},
        heads=pb.HeadScores(**{h: float(one["heads"][0, j]) for j, h in enumerate(HEAD_NAMES)}),
        stages=stages, model_version=query.model_version, experiments=query.experiments)
