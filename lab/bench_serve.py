"""`feedrank bench serve`: GetFeed latency over gRPC vs offered load, with the per-stage breakdown.

Setup (cached per world and two-tower version under ``var/bench/serve-cache``): every
post of the world is embedded by the current two-tower's post tower (content-only, so it
embeds posts it never trained on) into a FAISS IVF index; the Feast offline export of the
world is written; both go into an isolated stack (own Redis, model store, event log) with
copies of the current light and heavy rankers. The server runs as its own process
(`feedrank serve --world`), exactly as deployed; this process is only the load generator.

Load is open-loop: requests are *scheduled* at a fixed rate and latency is measured from
the scheduled time, so a slow server cannot slow the generator down and hide its own
queueing (no coordinated omission). Each request is for a random user (mostly cache
misses: the full funnel). Per-stage latencies come from the server's Prometheus
histograms (the deltas over each load level), RSS from the server process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import Config
from runtime.procs import tail

Step = Callable[[str, float], None]


def index_cache_dir(cfg: Config, world_dir: Path, tt_version: str) -> Path:
    """The world's index for these towers and ``retrieval.index`` kind (or its Feast export: ``tt_version`` "feast")."""
    kind = "" if tt_version == "feast" else f"-{cfg.retrieval.index}"
    return cfg.data_dir / "bench" / "serve-cache" / f"{world_dir.name}-{tt_version}{kind}"


def build_world_index(cfg: Config, world_dir: Path, step: Step) -> tuple[Path, str]:
    """Embed every post of the world with the current towers and build the IVF index (cached)."""
    import faiss
    import pyarrow.parquet as pq

    from models.train import index_for
    from models.store import ModelStore
    from models.towers import PostFeaturizer
    from models.train import load_numpy_towers, load_two_tower_model
    from core.units import DAY_MS
    from sim.world import World

    store = ModelStore.from_config(cfg)
    tt = store.current("two_tower")
    if tt is None:
        raise RuntimeError("no two_tower model: run `feedrank train` first")
    out = index_cache_dir(cfg, world_dir, tt)
    if (out / "index.faiss").exists():
        return out, tt
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    towers = load_numpy_towers(store, tt)
    model = load_two_tower_model(store, tt)
    world = World.load(world_dir)
    text = pq.read_table(world_dir / "posts.parquet", columns=["text"]).column("text").to_pylist()
    feat = PostFeaturizer()
    emb = np.zeros((world.n_posts, model.config["dim"]), dtype=np.float32)
    chunk = 50_000
    for i in range(0, world.n_posts, chunk):
        sl = slice(i, i + chunk)
        emb[sl] = towers.post(feat.arrays(text[sl], world.post_author[sl], world.post_topic[sl], world.post_ctype[sl]))
        step("embedding posts", min(1.0, (i + chunk) / world.n_posts))
    day = world.post_ts / DAY_MS
    idx = index_for(cfg, model, float(day.min()))
    step("building IVF index", 0.0)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    idx.build(np.arange(world.n_posts, dtype=np.int64), emb, day)
    faiss.omp_set_num_threads(1)
    idx.save(tmp / "index.faiss")
    np.save(tmp / "post_emb.npy", emb.astype(np.float16))
    (tmp / "params.json").write_text(json.dumps({"dim": idx.dim, "kind": idx.kind, "nlist": idx.nlist,
                                                 "nprobe": idx.nprobe, "day0": idx.day0,
                                                 "temperature": idx.temperature, "recency": idx.recency}))
    step("building IVF index", 1.0)
    os.replace(tmp, out)
    prune_index_caches(cfg, world_dir, out)
    return out, tt


def prune_index_caches(cfg: Config, world_dir: Path, keep: Path) -> list[Path]:
    """Remove the world's cached indexes of earlier towers (~750 MB each on 1M posts); a rolled-back
    two_tower rebuilds its own. The world's Feast export and the other index kinds of these towers are kept."""
    removed = []
    towers = keep.name[: -len(f"-{cfg.retrieval.index}")]
    for d in sorted(keep.parent.glob(f"{world_dir.name}-*")):
        if d != index_cache_dir(cfg, world_dir, "feast") and d.name.rsplit("-", 1)[0] != towers:  # kinds: no "-"
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def prepare(cfg: Config, bcfg: Config, world_dir: Path, step: Step) -> dict[str, str]:
    """The isolated stack's model store (copies + the world's index) and Feast export."""
    from features.feast_repo import export
    from models.store import ModelStore

    src = ModelStore.from_config(cfg)
    dst = ModelStore.from_config(bcfg)
    index_dir, tt = build_world_index(cfg, world_dir, step)
    versions = {}
    for model in ("two_tower", "light", "heavy"):
        ck, path = src.fetch(model)
        files = {name: (path / name).read_bytes() for name in ck.files}
        versions[model] = dst.publish(model, files, parent=ck.parent, data_window=ck.data_window, metrics=ck.metrics,
                                      feature_schema_hash=ck.feature_schema_hash, extra=ck.extra, promote=True).version
    versions["retrieval"] = dst.publish("retrieval", {n: index_dir / n for n in ("index.faiss", "post_emb.npy", "params.json")},
                                        parent=versions["two_tower"], promote=True).version
    feast_cache = index_cache_dir(cfg, world_dir, "feast")
    if not (feast_cache / "post_stats.parquet").exists():
        step("Feast export of the world", 0.0)
        export(bcfg, world_dir)
        shutil.copytree(bcfg.data_dir / "feast", feast_cache, dirs_exist_ok=True)
    else:
        shutil.copytree(feast_cache, bcfg.data_dir / "feast", dirs_exist_ok=True)
    return versions


def load_user_rows(bcfg: Config, step: Step) -> int:
    """The world's user_topic rows into the online store (Feast layout), as materialization would."""
    import pandas as pd

    from features.writer import FeatureWriter
    from features.feast_repo import apply

    apply(bcfg)
    df = pd.read_parquet(bcfg.data_dir / "feast" / "user_topic.parquet")
    w = FeatureWriter(bcfg)
    cols = ["topic_clicks", "topic_negative", "ctype_clicks", "clicks", "negatives", "clicks_1h", "last_engagement_ms"]
    for i in range(0, len(df), 20_000):
        part = df.iloc[i: i + 20_000]
        w.write("user_topic", part["user_id"].to_numpy(), {c: [list(v) for v in part[c]] if part[c].dtype == object
                                                          else part[c].to_numpy() for c in cols})
        step("user features -> online store", min(1.0, (i + 20_000) / len(df)))
    return len(df)


def _free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports (one Prometheus endpoint per worker)."""
    from core.services import free_port, port_open

    for _ in range(50):
        base = free_port()
        if base + n < 65536 and not any(port_open("127.0.0.1", base + i) for i in range(n)):
            return base
    raise RuntimeError("no run of free ports for the metrics endpoints")


def scrape_metrics(ports: list[int]) -> dict[str, float]:
    """{metric{labels}: value} of the histogram buckets/counts we need, summed over the workers."""
    out: dict[str, float] = {}
    for port in ports:
        _scrape_one(port, out)
    return out


def _scrape_one(port: int, out: dict[str, float]) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(("feedrank_stage_latency_seconds_bucket", "feedrank_stage_latency_seconds_count",
                            "feedrank_rpc_latency_seconds_bucket", "feedrank_result_cache_total",
                            "feedrank_candidates_total", "feedrank_degraded_responses_total", "feedrank_shadow_",
                            "feedrank_rpcs_total", "feedrank_shed_total")):
            key, _, val = line.rpartition(" ")
            out[key] = out.get(key, 0.0) + float(val)


def _get_feed_answered(port: int) -> float:
    """GetFeed calls one worker answered OK since it started."""
    got = scrape_metrics([port])
    return sum(v for k, v in got.items() if k.startswith("feedrank_rpcs_total") and 'rpc="GetFeed"' in k
               and 'code="OK"' in k)


def stage_quantiles(before: dict, after: dict, qs=(0.5, 0.99)) -> dict[str, dict[str, float]]:
    """Per-stage quantiles (ms) from histogram bucket deltas (linear within a bucket)."""
    import re

    buckets: dict[str, list[tuple[float, float]]] = {}
    for key, v in after.items():
        m = re.match(r'feedrank_stage_latency_seconds_bucket\{le="([^"]+)",stage="([^"]+)"\}', key) or \
            re.match(r'feedrank_stage_latency_seconds_bucket\{stage="([^"]+)",le="([^"]+)"\}', key)
        if not m:
            continue
        a, b = m.groups()
        le, stage = (a, b) if key.index("le=") < key.index("stage=") else (b, a)
        buckets.setdefault(stage, []).append((float("inf") if le == "+Inf" else float(le), v - before.get(key, 0.0)))
    out = {}
    for stage, bs in buckets.items():
        bs.sort()
        total = bs[-1][1]
        if total <= 0:
            continue
        res = {"count": int(total)}
        for q in qs:
            target, prev_le, prev_c = q * total, 0.0, 0.0
            for le, c in bs:
                if c >= target:
                    hi = le if le != float("inf") else prev_le * 2
                    frac = (target - prev_c) / max(c - prev_c, 1e-9)
                    res[f"p{int(q * 100)}_ms"] = round((prev_le + frac * (hi - prev_le)) * 1000, 2)
                    break
                prev_le, prev_c = le, c
        out[stage] = res
    return out


def _counter_delta(before: dict, after: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix)}


def run_load(address: str, secret: str, users: np.ndarray, rps: float, seconds: float, seed: int = 0,
             feed: str = "home", connections: int = 32) -> dict[str, Any]:
    """Open-loop GetFeed load over ``connections`` connections (many clients: the kernel spreads connections,
    not requests, over SO_REUSEPORT workers); latencies from each request's scheduled time."""
    import grpc

    from serving.edge import make_token
    from serving.protos import pb, rpc

    ft = {"home": pb.HOME, "explore": pb.EXPLORE, "following": pb.FOLLOWING}[feed]
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [rpc.FeedServiceStub(c) for c in channels]
    rng = np.random.default_rng(seed)
    n = int(rps * seconds)
    picks = rng.choice(users, n)
    tokens = {int(u): [("authorization", "Bearer " + make_token(secret, int(u)))] for u in np.unique(picks)}
    lat = np.full(n, np.nan)
    served = np.zeros(n, dtype=bool)  # answered OK (shed requests return fast: they must not flatter the quantiles)
    codes: dict[str, int] = {}
    reasons: dict[str, int] = {}  # degraded responses by reason (one response may have several)
    degraded = np.zeros(n, dtype=bool)
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.2

    def one(i: int) -> None:
        sched = t0 + i / rps
        u = int(picks[i])
        try:
            r = stubs[i % len(stubs)].GetFeed(pb.GetFeedRequest(user_id=u, feed_type=ft), metadata=tokens[u], timeout=5)
            code = "OK"
            if r.degraded:
                degraded[i] = True
                with lock:
                    for reason in r.degraded_reasons or ["unstated"]:
                        reasons[reason] = reasons.get(reason, 0) + 1
        except grpc.RpcError as e:
            code = e.code().name
        lat[i] = (time.perf_counter() - sched) * 1000
        served[i] = code == "OK"
        with lock:
            codes[code] = codes.get(code, 0) + 1

    with ThreadPoolExecutor(max_workers=64) as pool:
        for i in range(n):
            delay = t0 + i / rps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    for c in channels:
        c.close()
    from lab.bench import quantiles

    done = ~np.isnan(lat)
    return {"offered_rps": rps, "seconds": seconds, "requests": n, "codes": codes, "degraded": int(degraded.sum()),
            "degraded_reasons": dict(sorted(reasons.items())),
            "served_share": round(float(served.mean()), 4),
            "latency_ms": quantiles(lat[done & served]),  # of the requests answered OK
            "latency_ms_not_degraded": quantiles(lat[done & served & ~degraded]),
            "latency_ms_all_requests": quantiles(lat[done])}


#: GetFeed p99 goals (issue 19, on 1M posts): 25 ms up to 20 RPS, 50 ms above it (up to 150 RPS), 0% shed.
P99_GOALS_MS = ((20.0, 25.0), (float("inf"), 50.0))


def p99_goal_ms(rps: float) -> float:
    return next(goal for upto, goal in P99_GOALS_MS if rps <= upto)


def goal_met(level: dict[str, Any], p99_ms: float) -> dict[str, Any]:
    """A level meets its goal only with every request answered OK, none degraded, and p99 within ``p99_ms``."""
    p99 = level["latency_ms"].get("p99")
    p99 = float("inf") if p99 is None else p99
    why = []
    if level["served_share"] < 1.0:
        why.append(f"{1 - level['served_share']:.1%} not answered OK (shed or failed)")
    if level["degraded"]:
        why.append(f"{level['degraded']} responses degraded {level['degraded_reasons']}")
    if p99 > p99_ms:
        why.append(f"p99 {p99:.1f} ms > {p99_ms:g} ms")
    return {"p99_goal_ms": p99_ms, "met": not why, "why_not": why}


@dataclass
class ServingStack:
    """An isolated stack with ``feedrank serve --world`` running on it (see :func:`serving_stack`)."""

    bcfg: Config
    address: str
    proc: subprocess.Popen
    metrics_ports: list[int]  # one Prometheus endpoint per worker (metrics_port + worker index)
    world: Any  # sim.world.World
    world_dir: Path
    versions: dict[str, str]
    startup_s: float
    workers: int


@contextmanager
def serving_stack(cfg: Config, scale: str, workers: int = 0, step: Step | None = None, world_dir: Path | None = None,
                  name: str = "serve", events: str = "file", **overrides: str) -> Iterator[ServingStack]:
    """The world's isolated stack (own Redis, model store, event log; :func:`prepare`, user features
    in the online store) with ``feedrank serve --world`` as its own process, every worker healthy
    and serving metrics; ``overrides`` are FEEDRANK_* settings of the stack. On exit the server is
    terminated and the stack taken down."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from runtime import stack
    from lab.bench import isolated_config
    from core.services import free_port
    from serving.edge import auth_env
    from sim.world import World

    step = step or (lambda s, f: None)
    world_dir = world_dir or cfg.data_dir / "sim" / f"{scale}-{cfg.sim.seed}"
    if not (world_dir / "ground_truth.npz").exists():
        raise RuntimeError(f"no world at {world_dir}: run `feedrank sim generate --scale {scale}` first")
    n_workers = workers or cfg.serving.workers
    port, mport = free_port(), _free_ports(n_workers)
    bcfg = isolated_config(cfg, f"{name}-{scale}", events=events, FEEDRANK_SERVING_PORT=str(port),
                           FEEDRANK_SERVING_METRICS_PORT=str(mport), **overrides)
    bcfg = isolated_config(cfg, f"{name}-{scale}", events=events, FEEDRANK_SERVING_PORT=str(port),
                           FEEDRANK_SERVING_METRICS_PORT=str(mport), **overrides,
                           FEEDRANK_SERVING_WORKERS=str(n_workers),
                           FEEDRANK_MODEL_STORE="file://" + str(bcfg.data_dir / "models"),
                           FEEDRANK_PATHS_DATA_DIR=str(bcfg.data_dir), FEEDRANK_REDIS=bcfg.redis.uri,
                           FEEDRANK_EVENTS=bcfg.events.uri)
    versions = prepare(cfg, bcfg, world_dir, step)
    stack.up(bcfg)
    proc = None
    try:
        load_user_rows(bcfg, step)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_") or k == "FEEDRANK_CONFIG"}
        env.update({"FEEDRANK_PATHS_DATA_DIR": str(bcfg.data_dir), "FEEDRANK_REDIS": bcfg.redis.uri,
                    "FEEDRANK_EVENTS": bcfg.events.uri, "FEEDRANK_MODEL_STORE": bcfg.model_store.uri,
                    "FEEDRANK_SERVING_PORT": str(port), "FEEDRANK_SERVING_METRICS_PORT": str(mport),
                    "FEEDRANK_SERVING_HTTP_PORT": str(bcfg.serving.http_port),
                    "FEEDRANK_SERVING_WORKERS": str(n_workers),
                    "FEEDRANK_EVENTS_FSYNC": "true" if bcfg.events.fsync else "false", **auth_env(bcfg)})
        env.update({k: v for k, v in overrides.items() if k not in env})  # the caller's settings of the server
        log = open(bcfg.data_dir / "serve.log", "w")
        step("starting the server", 0.0)
        t_start = time.perf_counter()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "feedrank"), "serve", "--world", str(world_dir)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child has its own descriptor
        address = f"{bcfg.serving.host}:{port}"
        ch = grpc.insecure_channel(address)
        mports = [mport + i for i in range(n_workers)]
        while True:  # every worker must be up: each serves its own metrics endpoint once SERVING
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); the end of {bcfg.data_dir / 'serve.log'}:\n"
                                   f"{tail(bcfg.data_dir / 'serve.log')}")
            try:
                h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if h.status == health_pb2.HealthCheckResponse.SERVING:
                    scrape_metrics(mports)
                    break
            except (grpc.RpcError, OSError):
                time.sleep(0.5)
            if time.perf_counter() - t_start > 900:
                raise RuntimeError("server did not become healthy in 15 minutes")
        startup_s = time.perf_counter() - t_start
        ch.close()
        step("starting the server", 1.0)
        yield ServingStack(bcfg, address, proc, mports, World.load(world_dir), world_dir, versions, startup_s, n_workers)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.down(bcfg)


def shadow_candidate(bcfg: Config) -> str:
    """A heavy candidate for the shadow cost measurement: the current model's files published again as a new,
    not promoted version (the same network: the cost measured is the second scoring, not a bigger model)."""
    from models.store import ModelStore

    store = ModelStore.from_config(bcfg)
    ck, d = store.fetch("heavy")
    files = {name: d / name for name in ck.files}
    return store.publish("heavy", files, parent=ck.version, data_window=ck.data_window, metrics={"bench": "shadow cost"},
                         feature_schema_hash=ck.feature_schema_hash, promote=False).version


def wait_shadow(mports: list[int], active: bool, timeout_s: float = 120.0) -> None:
    """Until every worker reports ``feedrank_shadow_active`` as ``active`` (their loaders poll Redis)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        got = [scrape_metrics([p]).get("feedrank_shadow_active", 0.0) for p in mports]
        if all((g >= 1.0) == active for g in got):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the workers did not {'load' if active else 'drop'} the shadow candidate in {timeout_s:.0f} s")


def retrieval_recall(bcfg: Config, world: Any, users: np.ndarray, n_queries: int = 100,
                     nprobes: tuple[int, ...] = (96, 128, 160, 192, 256), seed: int = 0) -> dict[str, Any]:
    """Recall@ann_k of the index the server loaded, against exact search over every post, for
    ``n_queries`` of the bench's users embedded as the server embeds them (their Feast user_topic row
    and follows through the user tower), at the served nprobe and a few others (one FAISS thread)."""
    import faiss
    import pandas as pd

    from core.units import DAY_MS
    from models.retrieval import recall
    from models.store import ModelStore
    from models.train import load_numpy_towers, load_retrieval
    from serving.components import UserContext
    from serving.model_loader import user_embedding

    store = ModelStore.from_config(bcfg)
    index, version = load_retrieval(store)
    _, path = store.fetch("retrieval", version)
    emb = np.load(path / "post_emb.npy").astype(np.float32)
    towers = load_numpy_towers(store)
    rows = pd.read_parquet(bcfg.data_dir / "feast" / "user_topic.parquet").set_index("user_id")
    order = np.argsort(world.follow_src, kind="stable")
    src, dst = world.follow_src[order], world.follow_dst[order]
    picked = np.random.default_rng(seed).choice(users, min(n_queries, users.size), replace=False)
    q = []
    for u in picked.tolist():
        ctx = UserContext(user_id=u, following=np.unique(dst[np.searchsorted(src, u):np.searchsorted(src, u, "right")]))
        if u in rows.index:
            r = rows.loc[u]
            for name in ("topic_clicks", "topic_negative", "ctype_clicks"):
                if r[name] is not None and len(r[name]):
                    setattr(ctx, name, np.asarray(r[name], dtype=np.float32))
            ctx.clicks, ctx.negatives = int(r["clicks"] or 0), int(r["negatives"] or 0)
        q.append(user_embedding(towers, ctx))
    queries = np.asarray(q, dtype=np.float32)
    k = bcfg.candidates.ann_k
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    exact = index.exact(queries, k, np.arange(emb.shape[0]), emb, world.post_ts[: emb.shape[0]] / DAY_MS)
    faiss.omp_set_num_threads(1)
    sweep = []
    for npb in sorted({*nprobes, bcfg.retrieval.nprobe}):
        index.set_nprobe(npb)
        t0 = time.perf_counter()
        got = np.concatenate([index.search(queries[i: i + 1], k)[1] for i in range(len(queries))])
        sweep.append({"nprobe": npb, "recall": round(recall(got, exact), 4),
                      "ms_per_query": round((time.perf_counter() - t0) * 1000 / len(queries), 2)})
    served = next(t for t in sweep if t["nprobe"] == bcfg.retrieval.nprobe)
    return {"k": k, "queries": len(queries), "kind": index.kind, "nlist": int(getattr(index.index, "nlist", 0)),
            "nprobe": bcfg.retrieval.nprobe, "recall_at_k": served["recall"],
            "goal": 0.95, "met": served["recall"] >= 0.95, "nprobe_sweep": sweep}


def bench_serve(cfg: Config, scale: str = "large", rps_levels: tuple[float, ...] = (20.0,), seconds: float = 30.0,
                progress: Step | None = None, world_dir: Path | None = None, workers: int = 0,
                shadow: bool = False, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """``shadow``: every level runs twice, without and then with a shadow candidate scoring each HOME page after
    the response (models.shadow), so the JSON shows what shadow scoring costs the latency budget.
    ``overrides``: FEEDRANK_* settings of the server (e.g. the ANN candidate count)."""
    import psutil

    from models import shadow as shadow_mod
    from models.store import ModelStore

    step = progress or (lambda s, f: None)
    with serving_stack(cfg, scale, workers, step, world_dir, **(overrides or {})) as st:
        bcfg, address, world, mports, n_workers = st.bcfg, st.address, st.world, st.metrics_ports, st.workers
        has_follows = np.flatnonzero(np.bincount(world.follow_src, minlength=world.n_users) > 0)
        users = np.random.default_rng(1).choice(has_follows, min(100_000, has_follows.size), replace=False)
        ps = psutil.Process(st.proc.pid)

        def rss_mb() -> float:
            return sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]) / 2**20

        def cpu_s() -> float:  # user + system CPU of the server's processes
            return sum(sum(p.cpu_times()[:2]) for p in [ps, *ps.children(recursive=True)])

        def level(seed: int, rps: float) -> dict[str, Any]:
            before, cpu0 = scrape_metrics(mports), cpu_s()
            per_worker = [_get_feed_answered(p) for p in mports]
            res = run_load(address, bcfg.serving.jwt_secret, users, rps, seconds, seed=seed)
            after, cpu1 = scrape_metrics(mports), cpu_s()
            res["server_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / max(res["codes"].get("OK", 0), 1), 2)
            res["get_feed_answered_per_worker"] = [_get_feed_answered(p) - b for p, b in zip(mports, per_worker)]
            res["stages"] = stage_quantiles(before, after)
            res["candidates_per_request"] = {k: round(v / max(res["requests"], 1), 1) for k, v in
                                             _counter_delta(before, after, "feedrank_candidates_total").items()}
            res["cache"] = _counter_delta(before, after, "feedrank_result_cache_total")
            res["shadow_pages_scored"] = after.get("feedrank_shadow_pages_scored_total", 0.0) - before.get(
                "feedrank_shadow_pages_scored_total", 0.0)
            res["server_rss_mb"] = round(rss_mb(), 1)
            res["goal"] = goal_met(res, p99_goal_ms(rps))
            return res

        step("retrieval recall vs exact search", 0.0)
        recall_res = retrieval_recall(bcfg, world, users)  # before any load: it has the cores to itself
        step("retrieval recall vs exact search", 1.0)
        levels = []
        candidate = shadow_candidate(bcfg) if shadow else None
        run_load(address, bcfg.serving.jwt_secret, users[:2000], 10.0, 5.0, seed=99)  # warm-up, not reported
        for i, rps in enumerate(rps_levels):
            step(f"load {rps:g} RPS", 0.0)
            res = level(i, rps)
            if candidate:
                # without, with, without again (other users each pass: no pass finds the last one's cached
                # rankings); the cost is against the mean of the two passes without, so warm-up and drift
                # between passes do not count as the shadow's
                step(f"load {rps:g} RPS with a shadow candidate", 0.33)
                shadow_mod.start(bcfg, ModelStore.from_config(bcfg), candidate)
                wait_shadow(mports, True)
                with_shadow = level(1000 + i, rps)
                shadow_mod.stop(bcfg)
                wait_shadow(mports, False)
                step(f"load {rps:g} RPS without the shadow again", 0.67)
                again = level(2000 + i, rps)
                res["with_shadow"], res["without_shadow_again"] = with_shadow, again
                res["shadow_cost_ms"] = {
                    q: round(with_shadow["latency_ms"][q] - (res["latency_ms"][q] + again["latency_ms"][q]) / 2, 2)
                    for q in res["latency_ms"] if q in with_shadow["latency_ms"] and q in again["latency_ms"]}
            levels.append(res)
            step(f"load {rps:g} RPS", 1.0)
        return {"scale": scale, "world": str(st.world_dir), "posts": int(world.n_posts), "users": int(world.n_users),
                "follows": int(world.follow_src.size), "models": st.versions, "server_startup_s": round(st.startup_s, 1),
                "server": {"worker_processes": n_workers, "torch_threads": 1, "faiss_threads": 1, "grpc_threads": 8},
                "retrieval": {"index": recall_res["kind"], "nlist": recall_res["nlist"], "nprobe": bcfg.retrieval.nprobe,
                              "ann_k": bcfg.candidates.ann_k, "recall": recall_res},
                "p99_goals_ms": [[upto, goal] for upto, goal in P99_GOALS_MS if upto != float("inf")] + [["above", P99_GOALS_MS[-1][1]]],
                "shadow_candidate": candidate, "levels": levels}
