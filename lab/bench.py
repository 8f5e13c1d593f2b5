"""`feedrank bench ...`: measured numbers, written as JSON + markdown under bench/results/.

Every figure is measured in the run that reports it, on the machine it names.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from pathlib import Path

import numpy as np

from core.config import PROJECT_ROOT, Config


def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def quantiles(values: Any, digits: int = 2) -> dict[str, float | None]:
    """p50 / p90 / p99 / max of latencies (None each when there are none)."""
    a = np.asarray(values, dtype=np.float64)
    if not a.size:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {"p50": round(float(np.percentile(a, 50)), digits), "p90": round(float(np.percentile(a, 90)), digits),
            "p99": round(float(np.percentile(a, 99)), digits), "max": round(float(a.max()), digits)}


def write_result(name: str, result: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or PROJECT_ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    result = {"bench": name, "at": stamp, "machine": machine(), **result}
    path = out_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    md = [f"# bench: {name} ({stamp})", "", f"Machine: {result['machine']}", "", "```json",
          json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2), "```", ""]
    path.with_suffix(".md").write_text("\n".join(md))
    return path


def bench_retrieval(cfg: Config, world_dir: Path, k: int = 8000, n_tune: int = 100, n_latency: int = 1000,
                    target: float = 0.95, progress=None) -> dict:
    """Recall@k vs exact and per-query latency of the IVF index over every post of a world.

    Post vectors come from the current two-tower's post tower (content only, so it embeds
    posts it never saw); queries are user-tower embeddings of real user states.
    """
    import faiss
    import pyarrow.parquet as pq
    import torch

    from models.retrieval import recall
    from models.train import index_for
    from models.store import ModelStore
    from models.train import load_two_tower
    from features.offline import History
    from models.towers import PostFeaturizer, UserInputs, embed_posts, embed_users, follows_bag
    from core.units import DAY_MS
    from sim.world import World

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)  # one thread per serving worker, as in production
    step = progress or (lambda s, f: None)
    store = ModelStore.from_config(cfg)
    model, _ = load_two_tower(store)
    world = World.load(world_dir)
    step("embedding posts", 0.0)
    text = pq.read_table(world_dir / "posts.parquet", columns=["text"]).column("text").to_pylist()
    emb = np.zeros((world.n_posts, model.config["dim"]), dtype=np.float32)
    feat = PostFeaturizer()
    chunk = 100_000
    for i in range(0, world.n_posts, chunk):
        sl = slice(i, i + chunk)
        emb[sl] = embed_posts(model, feat(text[sl], world.post_author[sl], world.post_topic[sl], world.post_ctype[sl]))
        step("embedding posts", min(1.0, (i + chunk) / world.n_posts))
    day = world.post_ts / DAY_MS
    idx = index_for(cfg, model, float(day.min()))
    step("building IVF", 0.0)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building may use every core
    t0 = time.perf_counter()
    ids = np.arange(world.n_posts, dtype=np.int64)
    idx.build(ids, emb, day)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    # queries: user embeddings from random users' current engagement profile
    hist = History.load(world_dir, world)
    rng = np.random.default_rng(0)
    users = rng.choice(world.n_users, n_tune + n_latency, replace=False)

    st = hist.user_state(users, np.full(users.size, world.end_ms))
    fid, foff = follows_bag(world.follow_src, world.follow_dst, users, world.n_users)
    q = embed_users(model, UserInputs(torch.from_numpy(st.dense()), fid, foff))
    step("exact search for recall", 0.0)
    exact = idx.exact(q[:n_tune], k, ids, emb, day)
    step("tuning nprobe", 0.0)
    tuned = idx.tune_nprobe(q[:n_tune], k, exact, target=target)
    step("latency", 0.0)
    lat = []
    for i in range(n_tune, n_tune + n_latency):
        t1 = time.perf_counter()
        idx.search(q[i: i + 1], k)
        lat.append((time.perf_counter() - t1) * 1000)
    lat = np.array(lat)
    _, got = idx.search(q[:n_tune], k)
    return {"posts": int(world.n_posts), "k": k, "index": cfg.retrieval.index, "nlist": int(getattr(idx.index, "nlist", 0)),
            "nprobe": idx.nprobe, "recall_vs_exact": round(recall(got, exact), 4), "tuning": tuned["trials"],
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3), "p99": round(float(np.percentile(lat, 99)), 3),
                           "mean": round(float(lat.mean()), 3), "queries": int(lat.size)},
            "build_seconds": round(build_s, 1), "threads": 1, "world": str(world_dir)}


def bench_rankers(cfg: Config, n_light: int = 10_000, n_heavy: int = 500, repeats: int = 300) -> dict:
    """Light ranker over 10K candidates and the TorchScript heavy ranker over 500, one thread."""
    import torch

    from core.schema import HEAVY_FEATURES, LIGHT_FEATURES
    from models.rankers import LightRanker, load_torchscript
    from models.store import ModelStore

    torch.set_num_threads(1)
    store = ModelStore.from_config(cfg)
    _, lpath = store.fetch("light")
    light = LightRanker.from_bytes((lpath / "light.npz").read_bytes())
    hck, hpath = store.fetch("heavy")
    heavy = load_torchscript((hpath / "heavy.ts").read_bytes())
    rng = np.random.default_rng(0)
    xl = rng.normal(size=(n_light, len(LIGHT_FEATURES))).astype(np.float32)
    xh = torch.from_numpy(rng.normal(size=(n_heavy, len(HEAVY_FEATURES))).astype(np.float32))

    def timed(fn) -> dict:
        for _ in range(20):
            fn()  # warm-up (TorchScript profiling runs)
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1000)
        a = np.array(t)
        return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}

    with torch.inference_mode():
        heavy_t = timed(lambda: heavy(xh))
    return {"light": {"rows": n_light, **timed(lambda: light.score(xl))},
            "heavy": {"rows": n_heavy, "version": hck.version, **heavy_t}, "threads": 1}


# ----------------------------------------------------------------------------- streaming


_SCRATCH: list[Path] = []  # data dirs made by isolated_config, for scratch_removed_on_success


@contextmanager
def scratch_removed_on_success() -> Iterator[None]:
    """Remove the isolated data dirs made inside the block when it succeeds; keep and name them when it
    fails. Why: a run leaves its event log, Redis, checkpoints and copied models there (serve on 1M
    posts: ~1 GB a run; 18 GB had piled up here), and after a failure its logs are the diagnosis."""
    start = len(_SCRATCH)
    try:
        yield
    except BaseException:
        for d in _SCRATCH[start:]:
            print(f"benchmark data kept for diagnosis: {d}", file=sys.stderr)
        raise
    finally:
        made, _SCRATCH[start:] = _SCRATCH[start:], []
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def bench_events_uri(root: Path, events: str) -> str:
    """The isolated event log of a benchmark: ``file`` (a segment log under its data dir), ``kafka``
    (its own local broker on a free port, topic ``engagements``), or ``kafka://host:port/topic``
    (port 0: a free one; a loopback address gets its own broker, started by ``stack.up``)."""
    from urllib.parse import urlparse

    from core.services import free_port

    if events == "file":
        return "file://" + str(root / "events")
    if events == "kafka":
        events = "kafka://127.0.0.1:0/engagements"
    if events.startswith("kafka://"):
        u = urlparse(events)
        return f"kafka://{u.hostname or '127.0.0.1'}:{u.port or free_port()}/{u.path.strip('/') or 'engagements'}"
    raise ValueError(f"--events takes file, kafka or kafka://host:port/topic, got {events!r}")


def isolated_config(cfg: Config, name: str, events: str = "file", **overrides: str) -> Config:
    """The configuration with its own data dir, Redis port and event log: a benchmark never
    touches a developer's running stack."""
    from core.config import load_config
    from core.services import free_port

    root = cfg.data_dir / "bench" / f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    _SCRATCH.append(root)
    from serving.edge import embedded_auth

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_") or k == "FEEDRANK_CONFIG"}
    env.update(embedded_auth())  # the bench stack's own random JWT / cursor keys (placeholders are refused)
    env.update({"FEEDRANK_PATHS_DATA_DIR": str(root), "FEEDRANK_EVENTS": bench_events_uri(root, events),
                "FEEDRANK_REDIS": f"redis://127.0.0.1:{free_port()}/0", "FEEDRANK_FLINK_REST_PORT": str(free_port()),
                "FEEDRANK_SERVING_HTTP_PORT": str(free_port()),
                "FEEDRANK_MODEL_STORE": cfg.resolve_uri(cfg.model_store.uri)}, **overrides)
    return load_config(env)


def wait_progress(cfg: Config, key: str, target: float, timeout_s: float, step=None) -> tuple[float, list[tuple[float, dict]]]:
    """Poll the feature job's progress until ``key`` reaches ``target``; (seconds, samples)."""
    from features.progress import read_progress

    t0 = time.monotonic()
    samples = []
    while time.monotonic() - t0 < timeout_s:
        p = read_progress(cfg, "features")
        samples.append((time.monotonic(), p))
        if step:
            step(min(1.0, p.get(key, 0) / max(target, 1)))
        if p.get(key, 0) >= target:
            return time.monotonic() - t0, samples
        time.sleep(0.1)
    raise TimeoutError(f"feature job reached {key}={samples[-1][1].get(key, 0) if samples else 0} of {target} "
                       f"within {timeout_s}s")


def feature_job_rates(samples: list[tuple[float, dict]], n: int, forwarded: int) -> dict:
    """Throughput from the feature job's progress samples ``[(monotonic time, progress)]``.

    End to end: from the first sample showing the post operator's first flushed count to the
    first showing the user operator with all ``forwarded`` events, over the events that arrived
    in between, so Flink's start-up (submission, operators opening) is left out. The post
    operator's own steady rate is taken between 10% and 90% of ``n``.
    """
    post = [(t, p.get("post_events", 0)) for t, p in samples]
    t_first, done_first = next((t, v) for t, v in post if v > 0)
    t_done = next(t for t, p in samples if p.get("user_events", 0) >= forwarded and p.get("post_events", 0) >= n)
    lo = next(t for t, v in post if v >= 0.1 * n)
    hi = next(t for t, v in post if v >= 0.9 * n)
    return {"events_per_s": round((n - done_first) / (t_done - t_first), 1) if t_done > t_first else None,
            "post_operator_events_per_s_10_90": round(0.8 * n / (hi - lo), 1) if hi > lo else None,
            "seconds": round(t_done - t_first, 1)}


def bench_features(cfg: Config, n: int = 300_000, seed: int = 7, progress=None, events: str = "file") -> dict:
    """Throughput of the real-time feature job on its own stack.

    ``n`` synthetic events (every type; uniform over 10K users and 100K posts, so nearly
    every event dirties a different key: the worst case for batching) are written to the
    event log first (``events``: see :func:`bench_events_uri`; on Kafka in appends of
    ``bundle_events`` x partitions events, so a message carries a full bundle, as a segment
    line does); the job then reads them as fast as it can. Throughput is measured from the
    first flushed batch to the moment the last operator has the last event, so Flink's
    start-up is excluded (and reported separately).
    """
    from features.eventlog import open_configured_event_log
    from features.realtime import A, ENGAGEMENT, FOLLOW, KIND, UNFOLLOW
    from runtime import stack
    from jobs import feature_job as features
    from sim.eventgen import synthetic_events

    step = progress or (lambda s, f: None)
    bcfg = isolated_config(cfg, "features", events)
    stack.up(bcfg)
    job = None
    try:
        log = open_configured_event_log(bcfg)
        per_append = bcfg.events.bundle_events * getattr(log, "partitions", 5)
        forwarded = 0
        batch = []
        for i, ev in enumerate(synthetic_events(n, seed)):
            k = KIND[ev.type]
            forwarded += k in (FOLLOW, UNFOLLOW) or (k == ENGAGEMENT and A[ev.action] != A["view"])
            batch.append(ev)
            if len(batch) == per_append:
                log.append_many(batch)
                batch = []
                step("writing events", (i + 1) / n)
        log.append_many(batch)
        log.close()
        t_submit = time.monotonic()
        job = features.run_embedded(bcfg)
        _, s0 = wait_progress(bcfg, "post_events", 1, 180)
        _, s1 = wait_progress(bcfg, "post_events", n, 900, step=lambda f: step("feature job: post operator", f))
        _, s2 = wait_progress(bcfg, "user_events", forwarded, 300, step=lambda f: step("feature job: user operator", f))
        final = s2[-1][1]
        rates = feature_job_rates(s0 + s1 + s2, n, forwarded)
        return {
            "events": n, "workload": "sim.eventgen synthetic: 37% exposures, 60% engagements, 2% publishes, 1% follows; "
                                    "10K users x 100K posts uniform",
            **rates,
            "startup_s": round(s0[-1][0] - t_submit, 1),
            "forwarded_to_user_operator": forwarded,
            "pushed_rows": {v: int(final.get(f"{v}_pushed_rows", 0)) for v in ("post", "user", "topic")},
            "push_seconds": {v: final.get(f"{v}_push_seconds", 0) for v in ("post", "user", "topic")},
            "gc_seconds": final.get("gc_seconds"), "gc_full_collections": final.get("gc_full"),
            "gc_young_threshold": bcfg.streaming.gc_young_threshold,
            "flush_ms": bcfg.streaming.flush_ms, "python_execution_mode": bcfg.flink.python_execution_mode,
            "parallelism": bcfg.flink.parallelism, **event_log_info(bcfg, log),
        }
    finally:
        if job is not None:
            job.cancel().result()
        stack.down(bcfg)


def event_log_info(cfg: Config, log: Any) -> dict:
    """What a result must say of the event log it ran on."""
    info: dict[str, Any] = {"event_log": cfg.events.uri.split("://")[0], "bundle_events": cfg.events.bundle_events}
    if hasattr(log, "partitions"):
        info.update(kafka_partitions=log.partitions, kafka_broker="Apache Kafka (KRaft, local single node)")
    return info


def bench_freshness(cfg: Config, probes: int = 200, background_eps: float = 2000.0, progress=None,
                    events: str = "file") -> dict:
    """Event append -> feature visible to serving, p50/p99, while the job also carries a background load.

    Each probe appends one click on a post nobody has touched (the event log seals a
    segment every ``events.rotate_ms``, as for any producer) and times until (a) serving's
    in-memory :class:`PostStatsCache` and (b) a Feast ``get_online_features`` read show it.
    """
    import threading

    from features.change_streams import PostStatsCache

    from features.online_store import FeatureClient
    from features.eventlog import open_configured_event_log
    from core.events import Engagement
    from runtime import stack
    from jobs import feature_job as features
    from sim.eventgen import synthetic_events

    step = progress or (lambda s, f: None)
    bcfg = isolated_config(cfg, "freshness", events)
    stack.up(bcfg)
    job = None
    stop = threading.Event()
    try:
        log = open_configured_event_log(bcfg)
        job = features.run_embedded(bcfg)
        log.append_many(list(synthetic_events(100, 1, prefix="warm")))
        wait_progress(bcfg, "post_events", 100, 180)
        cache = PostStatsCache(bcfg, capacity=1 << 17).start()
        client = FeatureClient(bcfg)
        sent = [0]

        def background() -> None:  # steady load at background_eps through another writer
            bg = open_configured_event_log(bcfg)
            gen = synthetic_events(10_000_000, 2, prefix="bg")
            t0 = time.monotonic()
            while not stop.is_set():
                due = int((time.monotonic() - t0) * background_eps) - sent[0]
                if due > 0:
                    bg.append_many([next(gen) for _ in range(due)])
                    sent[0] += due
                time.sleep(0.02)
            bg.close()

        th = threading.Thread(target=background, daemon=True)
        th.start()
        # measure the steady state: the job has drained the warm-up and keeps pace with the load
        from features.progress import read_progress

        t_warm = time.monotonic()
        while time.monotonic() - t_warm < 120:
            time.sleep(1.0)
            if time.monotonic() - t_warm > 10 and read_progress(bcfg, "features").get("post_events", 0) >= 100 + sent[0] - background_eps:
                break
        warmup_s = time.monotonic() - t_warm
        cache_lat, feast_lat = [], []
        base = 50_000_000
        t_start = time.monotonic()
        for i in range(probes):
            pid = base + i
            t0 = time.monotonic()
            log.append_many([Engagement(event_id=f"probe-{i}", ts=1_767_571_200_000 + i, user_id=i % 1000, post_id=pid,
                                        action="click")])
            got_cache = got_feast = None
            while time.monotonic() - t0 < 10 and (got_cache is None or got_feast is None):
                if got_cache is None and cache.get(pid).get("clicks") == 1:
                    got_cache = time.monotonic() - t0
                if got_feast is None and client.posts([pid], ["post_stats:clicks"])["clicks"][0] == 1:
                    got_feast = time.monotonic() - t0
                time.sleep(0.01)
            cache_lat.append(got_cache if got_cache is not None else float("inf"))
            feast_lat.append(got_feast if got_feast is not None else float("inf"))
            step("freshness probes", (i + 1) / probes)
        elapsed = time.monotonic() - t_start
        stop.set()
        th.join(timeout=5)
        cache.stop()

        def pct(v: list[float]) -> dict:
            a = np.array(v) * 1000
            return {"p50_ms": round(float(np.percentile(a, 50)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
                    "max_ms": round(float(a.max()), 1), "max_at_probe": int(a.argmax()),
                    "over_2s": int((a > 2000).sum()), "missed_10s": int(np.isinf(a).sum())}

        return {"probes": probes, "serving_cache": pct(cache_lat), "feast_online_read": pct(feast_lat),
                "background_events_per_s": round(sent[0] / (elapsed + warmup_s), 1), "warmup_s": round(warmup_s, 1),
                "rotate_ms": bcfg.events.rotate_ms, "file_monitor_interval_ms": bcfg.flink.file_monitor_interval_ms,
                "flush_ms": bcfg.streaming.flush_ms, **event_log_info(bcfg, log)}
    finally:
        stop.set()
        if job is not None:
            job.cancel().result()
        stack.down(bcfg)
