"""Ranked candidates -> the protobuf responses (feed items with their reasons, DebugRanking)."""

from __future__ import annotations

from typing import Any

from core.schema import HEAD_NAMES, HEAVY_NAMES
from core.units import HOUR_MS
from serving.components import AD, IN_NETWORK, OUT_OF_NETWORK, SOURCE_NAMES, TRENDING, Candidates, Query
from serving.protos import pb
from serving.served import ServedExplanation
from serving.state import ServingState

SOURCE_CODES = {name: code for code, name in SOURCE_NAMES.items()}

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


def _heads(values: Any) -> Any:
    return pb.HeadScores(**{h: float(values[j]) for j, h in enumerate(HEAD_NAMES)})


def _funnel(counts: list) -> list[Any]:
    return [pb.StageCount(stage=s, candidates_in=int(i), candidates_out=int(o)) for s, i, o in counts]


def debug_response(query: Query, post: int, ranked: Candidates, one: Candidates) -> Any:
    """A fresh ranking traced for ``post`` (``ranked``: the feed's pipeline; ``one``: the DEBUG row)."""
    from serving.served import weighted

    i = ranked.index_of(post)
    stages = [pb.StageDecision(stage=t["stage"], decision=t["decision"], score=t["score"], rank=t["rank"],
                               of=t["of"], detail=t["detail"]) for t in query.trace]
    item: dict[str, Any] = {"source": SOURCE_NAMES[int(one.source[0])], "heads": one["heads"][0].tolist(),
                            "score": float(one["score"][0]), "heavy_score": float(one["score"][0])}
    if i is not None:  # the ranking's own values: with the adjustments and the re-ranker's decisions
        for col in ("score", "heavy_score"):
            if col in ranked:
                item[col] = float(ranked[col][i])
    return pb.DebugRankingResponse(
        post_id=post, served=i is not None and i < query.limit,
        position=int(ranked["position"][i]) if i is not None else 0,
        features={n: float(v) for n, v in zip(HEAVY_NAMES, one["x"][0])}, heads=_heads(one["heads"][0]),
        stages=stages, model_version=query.model_version, experiments=query.experiments, served_ms=query.now_ms,
        features_from="fresh", funnel=_funnel(query.funnel), source=int(ranked.source[i] if i is not None else one.source[0]),
        score=item["score"], heavy_score=item["heavy_score"],
        weighted=weighted(item, list(query.params.head_weights)),
        reasons=list(ranked["reasons"][i]) if i is not None and "reasons" in ranked else [],
        score_order=int(ranked["score_order"][i]) if i is not None and "score_order" in ranked else 0)


def served_debug_response(ex: ServedExplanation, state: ServingState) -> Any:
    """A post as a past request served it (:meth:`serving.feed.FeedRanker.explain_served`)."""
    from serving.served import journey, weighted

    item, page = ex.item, ex.page
    stages = [pb.StageDecision(**row) for row in journey(item, ex.funnel)]
    items = [pb.FeedItem(post_id=it["post_id"], author_id=int(state.catalog.author[it["post_id"]]),
                         score=float(it.get("score", 0.0)), heads=_heads(it["heads"]) if "heads" in it else None,
                         source=SOURCE_CODES[it["source"]], position=it["position"], reasons=it.get("reasons", []))
             for it in page["items"]]
    return pb.DebugRankingResponse(
        post_id=item["post_id"], served=True, position=item["position"],
        features={} if ex.features is None else {n: float(v) for n, v in zip(HEAVY_NAMES, ex.features)},
        heads=_heads(item["heads"]) if "heads" in item else None, stages=stages, model_version=page["model_version"],
        experiments=page["experiments"], request_id=ex.request_id, served_ms=int(page["served_ms"]),
        features_from=ex.features_from, funnel=_funnel(ex.funnel), source=SOURCE_CODES[item["source"]],
        score=float(item.get("score", 0.0)), heavy_score=float(item.get("heavy_score", 0.0)),
        weighted=weighted(item, page["head_weights"]), rescored=_heads(ex.rescored) if ex.rescored is not None else None,
        reasons=item.get("reasons", []), score_order=int(item.get("score_order", 0)), page=items,
        notes=ex.notes + [f"degraded when served: {r}" for r in page["degraded"]])
