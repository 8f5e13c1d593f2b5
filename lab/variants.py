"""The feed variants `feedrank eval experiments` compares, and one run of a variant: the same
simulated users over the same simulated window, served by the EdgeRank baseline or by the real
FeedService in-process (its clock driven by the simulation's, sessions instant), called over gRPC."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from lab.oracle import OracleCeiling, shares

VARIANTS = ("V0_chronological", "V1_follow_graph_rankers", "V2_full_funnel", "V2_without_light_ranker",
            "V2_without_reranker")


def pipelines_for(variant: str) -> dict[str, Any] | None:
    """The feed pipelines of a FeedService variant, HOME replaced (None = the production pipelines)."""
    from serving.funnel import Pipeline
    from serving.pipelines import FILTERS, PIPELINES, RANKING, SIDE_EFFECTS
    from serving.query_hydrators import UserQueryHydrator
    from serving.selectors import RerankSelector, ScoreOrderSelector
    from serving.candidate_sources import AdSource, AnnSource, FollowGraphSource, TrendingSource

    user = [UserQueryHydrator(fan_out_cache=True)]
    if variant in ("V2_full_funnel", "V2_without_light_ranker"):
        return None
    if variant == "V1_follow_graph_rankers":
        home = Pipeline("HOME-V1", user, [FollowGraphSource()], FILTERS, RANKING, SIDE_EFFECTS)
    elif variant == "V2_without_reranker":
        stages = [s if not isinstance(s, RerankSelector) else ScoreOrderSelector() for s in RANKING]
        home = Pipeline("HOME-no-rerank", user, [FollowGraphSource(), AnnSource(), TrendingSource(), AdSource()], FILTERS,
                        stages, SIDE_EFFECTS)
    else:
        raise ValueError(f"unknown variant {variant}")
    return {**PIPELINES, "home": home}


class PageRecorder:
    """Wraps a FeedApi: scores every served page against the ground truth at the moment it is served."""

    def __init__(self, api: Any, world: Any, clock: Any, k: int = 20):
        self.api, self.world, self.clock, self.k = api, world, clock, k
        self.pages: list[dict[str, float]] = []
        self.disc = 1.0 / np.log2(np.arange(2, k + 2))
        self.oracle = OracleCeiling(world)

    def get_feed(self, user_id: int, feed_type: str = "home", cursor: str = "", limit: int = 20, now_ms=None):
        page = self.api.get_feed(user_id, feed_type, cursor, limit, now_ms=now_ms)
        w = self.world
        posts = np.array([it.post_id for it in page.items if it.post_id < w.n_posts], dtype=np.int64)
        if posts.size:
            now = self.clock.now_ms()
            util = w.true_utility(user_id, posts, now)
            gains = np.maximum(util, 0.0)[: self.k]
            ideal = np.sort(gains)[::-1]
            idcg = float((ideal * self.disc[: ideal.size]).sum())
            authors = w.post_author[posts]
            pos = np.array([it.position for it in page.items if it.post_id < w.n_posts])
            self.pages.append({
                "ndcg": float((gains * self.disc[: gains.size]).sum() / idcg) if idcg > 0 else np.nan,
                **self.oracle.page(user_id, posts, pos, now),
                "discovery": float((~w.follows(np.full(posts.size, user_id), authors)).mean()),
                "distinct_authors": float(np.unique(authors).size / posts.size)})
        return page

    def __getattr__(self, name: str) -> Any:  # submit_signals, submit_feedback, publish_post, follow
        return getattr(self.api, name)


def run_variant(cfg: Config, variant: str, world_dir: Path, users: int, minutes: float, seed: int,
                detail: bool = False) -> dict[str, Any]:
    """One variant's run; ``detail`` adds ``_per_user`` ([sessions, impressions, examined, clicks, utility] per
    user) and ``_pages`` (each served page's metrics), for standard errors."""
    from features.eventlog import open_configured_event_log
    from lab.bench_serve import load_user_rows
    from sim.chronological import ChronologicalFeed
    from serving.client import GrpcFeedApi
    from serving.edge import RateLimiter
    from sim.clients import Population, SimClock
    from sim.world import World

    world = World.load(world_dir)  # fresh: a run publishes posts and adds follows to its world
    clock = SimClock(world.end_ms)
    server = None
    if variant == "V0_chronological":
        api: Any = ChronologicalFeed(world, open_configured_event_log(cfg))
    else:
        from features.connection import redis_client
        from serving.server import Server

        r = redis_client(cfg)
        r.flushdb()  # same starting state for every variant
        load_user_rows(cfg, lambda s, f: None)
        vcfg = cfg
        if variant == "V2_without_light_ranker":
            vcfg = cfg.model_copy(update={"funnel": cfg.funnel.model_copy(update={"light_k": 1_000_000})})
        server = Server(vcfg, bootstrap_dir=world_dir, clock=clock.now_ms, port=0, metrics_port=0, http_port=0,
                        pipelines=pipelines_for(variant))
        server.service.limiter = RateLimiter(1e9, 10**9)  # simulated time runs faster than the per-user limit assumes
        api = GrpcFeedApi(server.address, cfg.serving.jwt_secret, timeout_s=30)
    rec = PageRecorder(api, world, clock)
    pop = Population(world, cfg.clients, users, seed=seed, page_size=cfg.funnel.page_size,
                     repost_rate=cfg.sim.repost_rate, policy_flag_rate=cfg.sim.policy_flag_rate)
    t0 = time.perf_counter()
    try:
        st = pop.run(rec, clock, minutes * 60.0)
    finally:
        if server is not None:
            api.close()
            server.stop(grace=1.0)
    pages = rec.pages

    def mean(key: str) -> float:
        v = np.array([p[key] for p in pages], dtype=np.float64)
        return round(float(np.nanmean(v)), 4) if v.size else float("nan")

    out = {"variant": variant, "sessions": st.sessions, "served": st.served, "impressions": st.impressions,
           "examined": st.examined,
           "ctr": round(st.ctr, 4), "utility_total": round(st.utility, 1),
           "utility_per_examined": round(st.utility / max(st.examined, 1), 4),
           "page_expected_utility": mean("expected_utility"), "ndcg@20_vs_true_utility": mean("ndcg"),
           "discovery_share": mean("discovery"), "distinct_authors_per_item": mean("distinct_authors"),
           **shares(pages), "pages": len(pages), "errors": st.errors, "seconds": round(time.perf_counter() - t0, 1)}
    if detail:
        out["_per_user"], out["_pages"] = st.per_user, pages
    return out
