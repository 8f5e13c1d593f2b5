"""Runs a :class:`Pipeline`: sources in parallel (each with a timeout) -> de-duplication ->
filters -> hydrators / scorers / selectors in order. Times every stage, counts candidates
per source, and for DebugRanking traces one post through every decision."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.components import (AD, IN_NETWORK, SOURCE_NAMES, Candidates, CandidateSource, FeatureHydrator, Filter,
                                Query, Scorer, Selector, SideEffect)
from serving.hydrators import _member

log = logging.getLogger("feedrank.serving.funnel")


@dataclass
class Pipeline:
    name: str
    sources: list[CandidateSource]
    filters: list[Filter]
    stages: list[FeatureHydrator | Scorer | Selector]
    side_effects: list[SideEffect] = field(default_factory=list)

    def describe(self) -> list[str]:
        """One line per component, in order (shown by `feedrank serve --describe`)."""
        lines = [f"{self.name}:"]
        lines += [f"  source    {s.name}" for s in self.sources]
        lines += [f"  filter    {f.name}" for f in self.filters]
        for s in self.stages:
            writes = f"  -> {', '.join(s.writes)}" if getattr(s, "writes", None) else ""
            lines.append(f"  {s.kind:<9} {s.name}{writes}")
        lines += [f"  effect    {e.name}" for e in self.side_effects]
        return lines


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="source")


def _trace(query: Query, stage: str, decision: str, cands: Candidates | None = None, column: str | None = None,
           detail: str = "") -> None:
    if query.debug_post is None:
        return
    row: dict[str, Any] = {"stage": stage, "decision": decision, "score": 0.0, "rank": 0, "of": len(cands or ()),
                           "detail": detail}
    if cands is not None and column and column in cands:
        i = cands.index_of(query.debug_post)
        if i is not None:
            col = cands[column]
            row["score"] = float(col[i])
            row["rank"] = int((col > col[i]).sum()) + 1
    query.trace.append(row)


def fetch_candidates(pipeline: Pipeline, query: Query, state: Any) -> Candidates:
    t0 = time.perf_counter()
    timeout = min(state.cfg.candidates.source_timeout_ms / 1000.0, max(query.remaining_s(), 0.001))
    futures = {_POOL.submit(s.fetch, query, state): s for s in pipeline.sources}
    done, late = wait(futures, timeout=timeout)
    parts: list[Candidates] = []
    for fut, src in futures.items():  # in declaration order: earlier sources win duplicates
        if fut not in done:
            query.degrade(f"source_timeout:{src.name}")
            _trace(query, f"source:{src.name}", "timeout")
            continue
        try:
            c = fut.result()
        except Exception as e:  # noqa: BLE001 - a broken source never fails the request
            log.warning("source %s failed: %s", src.name, e)
            query.degrade(f"source_error:{src.name}")
            continue
        query.source_counts[src.name] = len(c)
        if query.debug_post is not None:
            _trace(query, f"source:{src.name}", "retrieved" if c.index_of(query.debug_post) is not None else "not_retrieved",
                   c, "ann")
        parts.append(c)
    cands = Candidates.concat(parts)
    if len(cands):
        # a sponsored post stays an ad even when another source also found it; otherwise earlier sources win
        order = np.argsort(cands.source != AD, kind="stable")
        cands = cands.take(order)
        _, first = np.unique(cands.ids, return_index=True)
        cands = cands.take(np.sort(first))
        followed = _member(query.user.following, state.catalog.author[cands.ids])
        cands.source[(cands.source != AD) & followed] = IN_NETWORK
    if query.debug_post is not None and cands.index_of(query.debug_post) is None and state.catalog.known(
            np.array([query.debug_post]))[0]:
        src = IN_NETWORK if _member(query.user.following, state.catalog.author[[query.debug_post]])[0] else 2
        extra = Candidates(np.array([query.debug_post]), np.array([src]), ann=np.zeros(1, dtype=np.float32))
        cands = Candidates.concat([cands, extra])
        _trace(query, "sources", "added_for_debug", detail="no source retrieved it; scored anyway")
    query.timings_ms["sources"] = (time.perf_counter() - t0) * 1000
    return cands


def run(pipeline: Pipeline, query: Query, state: Any) -> Candidates:
    """The ranked candidates (with columns: heads, score, x, reasons, position, ...)."""
    cands = fetch_candidates(pipeline, query, state)
    t0 = time.perf_counter()
    for f in pipeline.filters:
        if not len(cands):
            break
        keep = f.keep(query, state, cands)
        if query.debug_post is not None:
            i = cands.index_of(query.debug_post)
            if i is not None:
                _trace(query, f"filter:{f.name}", "kept" if keep[i] else "removed", cands)
        query.source_counts[f"removed:{f.name}"] = int((~keep).sum())
        cands = cands.take(np.flatnonzero(keep))
    query.timings_ms["filters"] = (time.perf_counter() - t0) * 1000
    if not len(cands):  # every source failed (flagged degraded already) or all filtered: empty, well-formed
        empty = Candidates.empty()
        empty["position"] = np.zeros(0, dtype=np.int64)
        empty["score"] = np.zeros(0, dtype=np.float32)
        return empty
    for stage in pipeline.stages:
        t0 = time.perf_counter()
        if isinstance(stage, FeatureHydrator):
            if len(cands):
                stage.hydrate(query, state, cands)
        elif isinstance(stage, Scorer):
            if len(cands):
                stage.score(query, state, cands)
                if query.debug_post is not None and stage.writes:
                    _trace(query, stage.name, "scored", cands, stage.writes[-1] if stage.writes[-1] != "fatigue" else "score")
        else:
            before = query.debug_post is not None and cands.index_of(query.debug_post) is not None
            cands = stage.select(query, state, cands)
            if before:
                kept = cands.index_of(query.debug_post) is not None
                _trace(query, stage.name, "selected" if kept else "not_selected", cands,
                       "position" if "position" in cands else None)
        query.timings_ms[stage.name] = query.timings_ms.get(stage.name, 0.0) + (time.perf_counter() - t0) * 1000
    return cands


def source_name(code: int) -> str:
    return SOURCE_NAMES.get(int(code), "unknown")
