"""The whole funnel on one page: one pipeline per feed type.

HOME       follow graph + interests + trending + ads -> light 10K->500 -> heavy 500->50 -> re-rank
EXPLORE    interests + trending, nothing by followed authors -> light -> heavy -> re-rank (no ads)
FOLLOWING  follow graph, reverse-chronological, no ML

`feedrank serve --describe` prints these, component by component.
"""

from __future__ import annotations

from serving.filters import HiddenFilter, OutOfNetworkOnlyFilter, OwnPostFilter, PolicyFilter, PreviouslySeenFilter
from serving.funnel import Pipeline
from serving.hydrators import HeavyFeatureHydrator, LightFeatureHydrator
from serving.scorers import (AuthorDiversityScorer, FeedbackFatigueScorer, HeavyRankerScorer, LightRankerScorer,
                             OriginalBoostScorer, PolicyDemotionScorer, RecencyScorer)
from serving.selectors import RerankSelector, TopKSelector
from serving.side_effects import ExposureLogSideEffect, SeenSideEffect
from serving.sources import AdSource, AnnSource, FollowGraphSource, TrendingSource

FILTERS = [OwnPostFilter(), HiddenFilter(), PreviouslySeenFilter(), PolicyFilter()]
RANKING = [
    LightFeatureHydrator(), LightRankerScorer(), TopKSelector("light_score", "light_k"),   # 10K -> 500
    HeavyFeatureHydrator(), HeavyRankerScorer(),                                           # one batched pass
    FeedbackFatigueScorer(), PolicyDemotionScorer(), OriginalBoostScorer(), AuthorDiversityScorer(),
    TopKSelector("score", "heavy_k", reserve_quotas=True),                                 # 500 -> 50
    RerankSelector(),                                                                      # rules -> ranking
]
SIDE_EFFECTS = [ExposureLogSideEffect(), SeenSideEffect()]

PIPELINES = {
    "home": Pipeline("HOME", [FollowGraphSource(), AnnSource(), TrendingSource(), AdSource()], FILTERS, RANKING,
                     SIDE_EFFECTS),
    "explore": Pipeline("EXPLORE", [AnnSource(), TrendingSource()], [*FILTERS, OutOfNetworkOnlyFilter()], RANKING,
                        SIDE_EFFECTS),
    "following": Pipeline("FOLLOWING", [FollowGraphSource()], FILTERS,
                          [RecencyScorer(), TopKSelector("score", "light_k"), RerankSelector()], SIDE_EFFECTS),
}
