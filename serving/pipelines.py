"""The whole funnel on one page: every pipeline that serves, component by component.

HOME       follow graph + interests + trending + ads -> light 10K->500 -> heavy 500->50 -> re-rank
EXPLORE    interests + trending, nothing by followed authors -> light -> heavy -> re-rank (no ads)
FOLLOWING  follow graph, reverse-chronological, no ML
REFRESH    a cached HOME / EXPLORE ranking within serving.result_cache_ttl_s: minus what was seen
           or hidden since, the top pages re-scored, re-ranked
DEBUG      DebugRanking: the feed type's pipeline traced for one post (no side effects), then
           that post's features and head scores
PAGE       a cursor page of a cached ranking: its rows re-hydrated for the exposure snapshot

`feedrank serve --describe` prints exactly these; the runner is :mod:`serving.funnel`.
"""

from __future__ import annotations

from serving.filters import (HiddenFilter, OutOfNetworkOnlyFilter, OwnPostFilter, PolicyFilter, PreviouslySeenFilter,
                             UnfollowedAuthorFilter)
from serving.funnel import HeadRescorer, Pipeline
from serving.hydrators import HeavyFeatureHydrator, LightFeatureHydrator
from serving.query_hydrators import UserQueryHydrator
from serving.scorers import (AuthorDiversityScorer, FeedbackFatigueScorer, HeavyRankerScorer, LightRankerScorer,
                             OriginalBoostScorer, PolicyDemotionScorer, RecencyScorer)
from serving.selectors import ChronologicalSelector, RerankSelector, TopKSelector
from serving.side_effects import ExposureLogSideEffect, SeenSideEffect, ServedRecordSideEffect, ShadowScoreSideEffect
from serving.candidate_sources import (AdSource, AnnSource, CachedRankingSource, DebugPostSource, FollowGraphSource,
                             TrendingSource)

FILTERS = [OwnPostFilter(), HiddenFilter(), UnfollowedAuthorFilter(), PreviouslySeenFilter(), PolicyFilter()]
ADJUSTMENTS = [FeedbackFatigueScorer(), PolicyDemotionScorer(), OriginalBoostScorer(), AuthorDiversityScorer()]


def ranking(*, ads: bool, out_of_network: bool) -> list:
    """Light 10K -> 500, heavy (one batched pass) + adjustments 500 -> 50, re-rank rules -> the ranking."""
    return [
        LightFeatureHydrator(), LightRankerScorer(), TopKSelector("light_score", "light_k"),
        HeavyFeatureHydrator(), HeavyRankerScorer(), *ADJUSTMENTS,
        TopKSelector("score", "heavy_k", reserve_quotas=True, out_of_network=out_of_network),
        RerankSelector(ads=ads, out_of_network=out_of_network),
    ]


RANKING = ranking(ads=True, out_of_network=True)                    # HOME's
SIDE_EFFECTS = [SeenSideEffect(), ExposureLogSideEffect(), ServedRecordSideEffect()]  # seen before the response,
                                                                    # exposures and the served record after
HOME_SIDE_EFFECTS = [*SIDE_EFFECTS, ShadowScoreSideEffect()]        # ...and a shadow candidate's scores, when one runs


def refresh(name: str, *, ads: bool, out_of_network: bool, side_effects: list) -> Pipeline:
    return Pipeline(name, [UserQueryHydrator(fan_out_cache=False)], [CachedRankingSource(fail_open=False)],
                    [PreviouslySeenFilter(), HiddenFilter(), UnfollowedAuthorFilter()],
                    [HeadRescorer(2, [LightFeatureHydrator(), HeavyFeatureHydrator(), HeavyRankerScorer(), *ADJUSTMENTS]),
                     RerankSelector(ads=ads, out_of_network=out_of_network)],
                    side_effects)


PIPELINES = {
    "home": Pipeline("HOME", [UserQueryHydrator(fan_out_cache=True)],
                     [FollowGraphSource(), AnnSource(), TrendingSource(), AdSource()], FILTERS, RANKING,
                     HOME_SIDE_EFFECTS),
    "explore": Pipeline("EXPLORE", [UserQueryHydrator(fan_out_cache=False)], [AnnSource(), TrendingSource()],
                        [*FILTERS, OutOfNetworkOnlyFilter()], ranking(ads=False, out_of_network=False), SIDE_EFFECTS),
    "following": Pipeline("FOLLOWING", [UserQueryHydrator(fan_out_cache=True)], [FollowGraphSource()], FILTERS,
                          [RecencyScorer(), TopKSelector("score", "light_k"), ChronologicalSelector()], SIDE_EFFECTS),
}
REFRESH = {  # FOLLOWING is never refreshed from the cache: it is cheap and must show new posts at once
    "home": refresh("HOME-REFRESH", ads=True, out_of_network=True, side_effects=HOME_SIDE_EFFECTS),
    "explore": refresh("EXPLORE-REFRESH", ads=False, out_of_network=False, side_effects=SIDE_EFFECTS),
}
DEBUG = Pipeline("DEBUG", [], [DebugPostSource(fail_open=False)], [],
                 [LightFeatureHydrator(), HeavyFeatureHydrator(), HeavyRankerScorer()])
PAGE = [LightFeatureHydrator(), HeavyFeatureHydrator()]   # a cursor page's rows: features for the exposure snapshot
