"""Runs a :class:`Pipeline`: query hydrators -> sources in parallel (each with a timeout and its
declared failure policy) -> de-duplication -> filters -> hydrators / scorers / selectors in order;
then, on the page served, the side effects (synchronous ones inline, asynchronous ones handed to
the side-effect worker). Times every stage, counts candidates per source, records each component
run in ``query.executed``, and for DebugRanking traces one post through every decision."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import numpy as np

from opentelemetry import context as otel_context

from serving.deadlines import COSTS
from serving.tracing import tracer
from serving.components import (AD, IN_NETWORK, OUT_OF_NETWORK, Candidates, CandidateSource,
                                Component, FeatureHydrator, Filter, FunnelContext, Query, QueryHydrator, Scorer,
                                Selector, SideEffect, member)

log = logging.getLogger("feedrank.serving.funnel")

Stage = Union[FeatureHydrator, Scorer, Selector]


class PipelineError(ValueError):
    """A pipeline whose components do not fit together (raised at construction)."""


class SourceUnavailable(RuntimeError):
    """A source declared fail-closed failed or was late: the request fails UNAVAILABLE."""


class HeadRescorer(Selector):
    """The first ``pages`` pages of an already ranked list re-hydrated and re-scored by ``stages``
    (features and engagement counts have moved since it was ranked); the rest keep their scores."""

    def __init__(self, pages: int, stages: list[Stage]):
        self.pages, self.stages = pages, stages
        made: set[str] = set()
        reads: list[str] = []
        for s in stages:
            reads += [c for c in s.reads if c not in made and c not in reads]
            made |= set(s.writes)
        self.reads, self.writes = tuple(reads), tuple(dict.fromkeys(c for s in stages for c in s.writes))

    def params(self) -> str:
        return f"the top {self.pages} pages"

    def select(self, query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
        top = min(len(cands), self.pages * max(query.limit, 1))
        if not top:
            return cands
        head = cands.take(np.arange(top))
        head = run_stages(self.stages, query, ctx, head)
        return Candidates.concat([head, cands.take(np.arange(top, len(cands)))])


@dataclass
class Pipeline:
    """One feed's funnel, in the order it runs. Checks at construction that every column a component
    reads is written by a source or an earlier component."""

    name: str
    query_hydrators: list[QueryHydrator]
    sources: list[CandidateSource]
    filters: list[Filter]
    stages: list[Stage]
    side_effects: list[SideEffect] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sources:
            raise PipelineError(f"{self.name}: no candidate source")
        have = {c for s in self.sources for c in s.writes}
        for comp in [*self.filters, *self.stages, *self.side_effects]:
            for col in comp.reads:
                if col not in have:
                    raise PipelineError(f"{self.name}: {comp.name} reads column {col!r}, which no source or earlier "
                                        f"component writes (written so far: {', '.join(sorted(have)) or 'none'})")
            have |= set(comp.writes)

    def components(self) -> Iterator[Component]:
        """Every component, in the order it runs (a HeadRescorer's stages after it)."""
        yield from self.query_hydrators
        yield from self.sources
        yield from self.filters
        for s in self.stages:
            yield s
            if isinstance(s, HeadRescorer):
                yield from s.stages
        yield from self.side_effects

    def describe(self) -> list[str]:
        """One line per component, in order (shown by `feedrank serve --describe`)."""
        lines = [f"{self.name}:"]
        for c in [*self.query_hydrators, *self.sources, *self.filters]:
            lines.append(f"  {c.describe()}")
        for s in self.stages:
            lines.append(f"  {s.describe()}")
            if isinstance(s, HeadRescorer):
                lines += [f"      {x.describe()}" for x in s.stages]
        lines += [f"  {e.describe()}" for e in self.side_effects]
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


def _ran(query: Query, comp: Component) -> None:
    query.executed.append(f"{comp.kind} {comp.name}")


def fetch_candidates(pipeline: Pipeline, query: Query, ctx: FunnelContext) -> Candidates:
    t0 = time.perf_counter()
    timeout = min(ctx.cfg.candidates.source_timeout_ms / 1000.0, max(query.remaining_s(), 0.001))
    parent = otel_context.get_current()  # the request's span, for the sources' spans in the pool's threads

    def fetch(s: CandidateSource) -> Candidates:
        with tracer.start_as_current_span(f"source:{s.name}", context=parent) as span:
            c = s.fetch(query, ctx)
            span.set_attribute("candidates", len(c))
            return c

    futures = {_POOL.submit(fetch, s): s for s in pipeline.sources}
    done, _ = wait(futures, timeout=timeout)
    parts: list[Candidates] = []
    for fut, src in futures.items():  # in declaration order: earlier sources win duplicates
        _ran(query, src)
        if fut not in done:
            _trace(query, f"source:{src.name}", "timeout")
            if not src.fail_open:
                raise SourceUnavailable(f"candidate source {src.name} did not answer within {timeout * 1000:.0f} ms")
            query.degrade(f"source_timeout:{src.name}")
            continue
        try:
            c = fut.result()
        except Exception as e:  # noqa: BLE001 - a fail-open source never fails the request
            if not src.fail_open:
                raise SourceUnavailable(f"candidate source {src.name} failed: {e}") from e
            log.warning("source %s failed: %s", src.name, e)
            query.degrade(f"source_error:{src.name}")
            continue
        query.source_counts[src.name] = len(c)
        query.funnel.append((f"source:{src.name}", 0, len(c)))
        if query.debug_post is not None:
            _trace(query, f"source:{src.name}", "retrieved" if c.index_of(query.debug_post) is not None else "not_retrieved",
                   c, "ann")
        parts.append(c)
    cands = Candidates.concat(parts)
    if len(parts) > 1:
        # a sponsored post stays an ad even when another source also found it; otherwise earlier sources win
        order = np.argsort(cands.source != AD, kind="stable")
        cands = cands.take(order)
        _, first = np.unique(cands.ids, return_index=True)
        cands = cands.take(np.sort(first))
        followed = member(query.user.following, ctx.catalog.author[cands.ids])
        cands.source[(cands.source != AD) & followed] = IN_NETWORK
    if query.debug_post is not None and cands.index_of(query.debug_post) is None and ctx.catalog.known(
            np.array([query.debug_post]))[0]:
        followed = member(query.user.following, ctx.catalog.author[[query.debug_post]])[0]
        extra = Candidates(np.array([query.debug_post]), np.array([IN_NETWORK if followed else OUT_OF_NETWORK]),
                           ann=np.zeros(1, dtype=np.float32))
        cands = Candidates.concat([cands, extra])
        _trace(query, "sources", "added_for_debug", detail="no source retrieved it; scored anyway")
    query.funnel.append(("sources", sum(len(p) for p in parts), len(cands)))  # after duplicates are merged
    query.timings_ms["sources"] = (time.perf_counter() - t0) * 1000
    return cands


def _within_deadline(stages: list[Stage], i: int, query: Query, cands: Candidates) -> Stage:
    """``stages[i]``, or its ``deadline_fallback`` when an input column is missing (an earlier stage fell back)
    or the request's remaining time is less than the stage's cost estimate plus the estimates of the later
    stages that must run anyway (:mod:`serving.deadlines`)."""
    stage = stages[i]
    fallback = getattr(stage, "deadline_fallback", None)
    if fallback is None:
        return stage
    if any(c not in cands for c in stage.reads):
        return fallback
    need = COSTS.expected_ms(stage.name) + sum(COSTS.expected_ms(s.name) for s in stages[i + 1:]
                                               if getattr(s, "deadline_fallback", None) is None)
    if need and query.remaining_s() * 1000 < need:
        query.degrade(f"deadline:{stage.name}")
        _trace(query, stage.name, "skipped", detail=f"{query.remaining_s() * 1000:.1f} ms left, needs ~{need:.1f} ms")
        return fallback
    return stage


def run_stages(stages: list[Stage], query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
    """Hydrators, scorers and selectors in order, timed (per component name) and traced; a stage the request
    has no time left for is replaced by its cheaper stand-in (:func:`_within_deadline`)."""
    for i in range(len(stages)):
        t0 = time.perf_counter()
        if not isinstance(stages[i], Selector) and not len(cands):
            continue
        stage = _within_deadline(stages, i, query, cands)
        _ran(query, stage)
        with tracer.start_as_current_span(stage.name) as span:
            span.set_attribute("candidates_in", len(cands))
            n_in = len(cands)
            cands = _run_stage(stage, query, ctx, cands)
            span.set_attribute("candidates_out", len(cands))
        if isinstance(stage, Selector):
            query.funnel.append((stage.name, n_in, len(cands)))
        ms = (time.perf_counter() - t0) * 1000
        query.timings_ms[stage.name] = query.timings_ms.get(stage.name, 0.0) + ms
        if stage is stages[i]:
            COSTS.observe(stage.name, ms)
    return cands


def _run_stage(stage: Stage, query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
    """One hydrator, scorer or selector on the candidates (a selector returns new ones); traced for DebugRanking."""
    if isinstance(stage, FeatureHydrator):
        stage.hydrate(query, ctx, cands)
    elif isinstance(stage, Scorer):
        stage.score(query, ctx, cands)
        if query.debug_post is not None and stage.writes:
            _trace(query, stage.name, "scored", cands, stage.writes[-1] if stage.writes[-1] != "fatigue" else "score")
    else:
        before = query.debug_post is not None and cands.index_of(query.debug_post) is not None
        cands = stage.select(query, ctx, cands)
        if before:
            kept = cands.index_of(query.debug_post) is not None
            _trace(query, stage.name, "selected" if kept else "not_selected", cands,
                   "position" if "position" in cands else None)
    return cands


def run(pipeline: Pipeline, query: Query, ctx: FunnelContext, hydrate_query: bool = True) -> Candidates:
    """The ranked candidates (with columns: heads, score, x, reasons, position, ...). ``hydrate_query=False``
    only for a query whose user is set already (the start-up warm-up)."""
    with tracer.start_as_current_span(f"pipeline:{pipeline.name}") as span:
        query.pipeline = pipeline.name
        cands = _run(pipeline, query, ctx, hydrate_query)
        span.set_attribute("candidates", len(cands))
        return cands


def _run(pipeline: Pipeline, query: Query, ctx: FunnelContext, hydrate_query: bool) -> Candidates:
    t0 = time.perf_counter()
    if hydrate_query:
        for h in pipeline.query_hydrators:
            _ran(query, h)
            with tracer.start_as_current_span(h.name):
                h.hydrate(query, ctx)
        query.timings_ms["user"] = (time.perf_counter() - t0) * 1000
    with tracer.start_as_current_span("sources") as span:
        cands = fetch_candidates(pipeline, query, ctx)
        span.set_attribute("candidates", len(cands))
    t0 = time.perf_counter()
    for f in pipeline.filters:
        if not len(cands):
            break
        _ran(query, f)
        keep = f.keep(query, ctx, cands)
        if query.debug_post is not None:
            i = cands.index_of(query.debug_post)
            if i is not None:
                _trace(query, f"filter:{f.name}", "kept" if keep[i] else "removed", cands)
        query.source_counts[f"removed:{f.name}"] = int((~keep).sum())
        query.funnel.append((f"filter:{f.name}", len(cands), int(keep.sum())))
        cands = cands.take(np.flatnonzero(keep))
    query.timings_ms["filters"] = (time.perf_counter() - t0) * 1000
    if not len(cands):  # every source failed (flagged degraded already) or all filtered: empty, well-formed
        empty = Candidates.empty()
        empty["position"] = np.zeros(0, dtype=np.int64)
        empty["score"] = np.zeros(0, dtype=np.float32)
        return empty
    return run_stages(pipeline.stages, query, ctx, cands)


def run_side_effects(pipeline: Pipeline, query: Query, ctx: FunnelContext, page: Candidates,
                     submit: Callable[[SideEffect, Query, Candidates], None]) -> None:
    """The pipeline's side effects on the page served, in order: synchronous ones now (a failure flags the
    response degraded: ``redis_unavailable`` or ``side_effect_error:<name>``), asynchronous ones through
    ``submit`` (the side-effect worker)."""
    from serving.state import RedisUnavailable

    for effect in pipeline.side_effects:
        _ran(query, effect)
        if effect.asynchronous:
            submit(effect, query, page)
            continue
        try:
            effect.apply(ctx, effect.prepare(query, ctx, page))
        except RedisUnavailable:
            query.degrade("redis_unavailable")
        except Exception as e:  # noqa: BLE001 - the page is served; the response says what did not happen
            log.warning("side effect %s of request %s failed: %s", effect.name, query.request_id, e)
            query.degrade(f"side_effect_error:{effect.name}")


