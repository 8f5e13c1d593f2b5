"""`feedrank bench signals`: what "OK means durable" costs SubmitSignals.

Two measurements, both closed loop (each client sends its next call when the last one answered),
at several concurrencies, so throughput and tail latency are read off the same runs:

- ``grpc``: SubmitSignals against ``feedrank serve --world`` on an isolated stack (own Redis,
  model store, event log; set up as ``bench serve`` does). Each call carries ``per_call`` signals
  for one user, distinct (action, post) pairs sent with an admin token (the served-exposure check
  is for end-user tokens), users round-robin so no per-user rate limit is hit. Reports OK calls/s,
  accepted signals/s, latency p50/p99 of the OK calls, the answer codes (RESOURCE_EXHAUSTED =
  load shedding at ``serving.max_concurrent_rpcs``), and for ``file://`` the events found in the
  log afterwards (every accepted one must be there).
- ``event_log``: the ``file://`` log alone, in this process: threads appending ``per_call`` events
  per call. The group commit's appends/s, p50/p99 and events per fsync, with fsync on and off
  (off = written to the OS only: the cost of waiting for the disk). Needs no world or models.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable


from core.config import Config
from lab.bench import quantiles

Step = Callable[[str, float], None]


def _closed_loop(clients: int, seconds: float, call: Callable[[int, int], str]) -> dict[str, Any]:
    """``clients`` threads calling ``call(client, i)`` (returns an answer code) for ``seconds``.
    Throughput and latency are of the calls answered OK (a shed call returns fast: it must not
    flatter the quantiles); ``latency_ms_all_calls`` includes the others."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    ok: list[list[bool]] = [[] for _ in range(clients)]
    codes: list[dict[str, int]] = [{} for _ in range(clients)]
    counter = iter(range(1 << 62))
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    t_end = [0.0]

    def run(c: int) -> None:
        start.wait()
        while time.perf_counter() < t_end[0]:
            with lock:
                i = next(counter)
            t0 = time.perf_counter()
            code = call(c, i)
            lat[c].append((time.perf_counter() - t0) * 1000)
            ok[c].append(code == "OK")
            codes[c][code] = codes[c].get(code, 0) + 1

    ths = [threading.Thread(target=run, args=(c,), daemon=True) for c in range(clients)]
    for th in ths:
        th.start()
    t_end[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for th in ths:
        th.join()
    wall = time.perf_counter() - t0
    all_lat = [x for per in lat for x in per]
    ok_lat = [x for per, oks in zip(lat, ok) for x, good in zip(per, oks) if good]
    merged: dict[str, int] = {}
    for per in codes:
        for k, v in per.items():
            merged[k] = merged.get(k, 0) + v
    return {"clients": clients, "seconds": round(wall, 2), "calls": len(all_lat), "ok_calls": len(ok_lat),
            "calls_per_s": round(len(ok_lat) / wall, 1), "codes": merged, "latency_ms": quantiles(ok_lat, 3),
            "latency_ms_all_calls": quantiles(all_lat, 3)}


def bench_event_log(root: Path, threads: tuple[int, ...] = (1, 8, 32), seconds: float = 5.0, per_call: int = 10,
                    fsync: bool = True, log_class: Any = None) -> list[dict[str, Any]]:
    """Appends of ``per_call`` events from each of ``threads`` threads, closed loop, on a fresh log
    per level. ``log_class`` swaps the implementation (an older FileEventLog, for before/after)."""
    from features.eventlog_file import FileEventLog
    from core.events import Action, Engagement

    cls = log_class or FileEventLog
    out = []
    for n in threads:
        d = root / f"log-{n}-{'fsync' if fsync else 'nofsync'}"
        shutil.rmtree(d, ignore_errors=True)
        log = cls(d, fsync=fsync)

        def call(c: int, i: int) -> str:
            log.append_many([Engagement(event_id=f"b{c}-{i}-{j}", user_id=(i * 31 + j) % 5000, post_id=j + 1,
                                        action=Action.CLICK, ts=1_767_571_200_000 + i) for j in range(per_call)])
            return "OK"

        res = _closed_loop(n, seconds, call)
        log.close()
        res["events_per_s"] = round(res["calls_per_s"] * per_call, 1)
        commits = getattr(log, "commits", None)
        if commits:
            res["group_commits"] = commits
            res["events_per_commit"] = round(res["calls"] * per_call / commits, 1)
        res["fsync"] = fsync
        out.append(res)
        shutil.rmtree(d, ignore_errors=True)
    return out


def bench_event_log_only(cfg: Config, threads: tuple[int, ...] = (1, 8, 32), seconds: float = 5.0,
                         per_call: int = 10, progress: Step | None = None) -> dict[str, Any]:
    """The ``event_log`` part alone, in a scratch dir under the data dir (the disk the log uses)."""
    step = progress or (lambda s, f: None)
    base = cfg.data_dir / "bench"
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="signals-log-", dir=base))
    try:
        levels = []
        for fsync in (True, False):
            step(f"event log, fsync={'on' if fsync else 'off'}", 0.0)
            levels += bench_event_log(root, threads, seconds, per_call, fsync)
            step(f"event log, fsync={'on' if fsync else 'off'}", 1.0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"per_call": per_call, "disk_of": str(base), "levels": levels}


def _signals_for(user: int, rnd: int, per_call: int, n_posts: int, pb: Any) -> list[Any]:
    """``per_call`` signals of one user, an (action, post) pair never sent before by that user."""
    actions = (pb.VIEW, pb.CLICK, pb.LIKE, pb.COMMENT, pb.SHARE, pb.DWELL)
    out = []
    for j in range(per_call):
        k = rnd * per_call + j
        a = actions[k % len(actions)]
        out.append(pb.Signal(post_id=(user * 7919 + k) % n_posts, action=a, position=j + 1,
                             dwell_ms=1500 if a == pb.DWELL else 0))
    return out


def bench_signals(cfg: Config, scale: str = "small", concurrency: tuple[int, ...] = (1, 8, 32), seconds: float = 20.0,
                  per_call: int = 10, events: str = "file", progress: Step | None = None, workers: int = 0,
                  world_dir: Path | None = None, event_log_seconds: float = 5.0, fsync: bool = True) -> dict[str, Any]:
    """SubmitSignals over gRPC (see module docstring); then, for ``file://``, the log alone for
    ``event_log_seconds`` per level (0 = not). ``fsync=False``: the server acknowledges file://
    appends before they reach the disk (the baseline that shows what durability costs)."""
    import grpc

    from lab.bench_serve import serving_stack
    from serving.edge import config_token
    from serving.protos import pb, rpc

    step = progress or (lambda s, f: None)
    with serving_stack(cfg, scale, workers, step, world_dir, name="signals", events=events,
                       FEEDRANK_EVENTS_FSYNC="true" if fsync else "false") as st:
        bcfg, address, world, world_dir = st.bcfg, st.address, st.world, st.world_dir
        versions, startup_s, n_workers = st.versions, st.startup_s, st.workers
        n_users, n_posts = int(world.n_users), int(world.n_posts)
        meta = [("authorization", "Bearer " + config_token(bcfg, 0, admin=True))]
        channels = [grpc.insecure_channel(address) for _ in range(4)]
        stubs = [rpc.FeedServiceStub(c) for c in channels]
        accepted = [0, 0]  # this level, all calls
        alock = threading.Lock()
        used = [0]  # calls made so far over all levels: every call gets fresh (user, round) pairs

        def call(c: int, i: int) -> str:
            k = used[0] + i
            user, rnd = k % n_users, k // n_users
            req = pb.SubmitSignalsRequest(user_id=user, signals=_signals_for(user, rnd, per_call, n_posts, pb))
            try:
                r = stubs[c % len(stubs)].SubmitSignals(req, metadata=meta, timeout=10)
            except grpc.RpcError as e:
                return e.code().name
            with alock:
                accepted[0] += r.accepted
                accepted[1] += r.accepted
            return "OK"

        levels = []
        _closed_loop(4, 2.0, call)  # warm-up, not reported
        used[0] += 1_000_000
        for n in concurrency:
            step(f"{n} concurrent clients", 0.0)
            accepted[0] = 0
            res = _closed_loop(n, seconds, call)
            used[0] += res["calls"] + 1000
            res["accepted_signals_per_s"] = round(accepted[0] / res["seconds"], 1)
            res["accepted_share"] = round(accepted[0] / max(res["ok_calls"] * per_call, 1), 4)  # of the OK calls
            levels.append(res)
            step(f"{n} concurrent clients", 1.0)
        for ch in channels:
            ch.close()
        result: dict[str, Any] = {
            "scale": scale, "world": str(world_dir), "users": n_users, "posts": n_posts, "models": versions,
            "server_startup_s": round(startup_s, 1), "server": {"worker_processes": n_workers},
            "event_log": bcfg.events.uri.split(":")[0], "fsync": bcfg.events.fsync, "signals_per_call": per_call,
            "grpc": levels, "accepted_total": accepted[1]}
    uri = bcfg.resolve_uri(bcfg.events.uri)
    if uri.startswith("file://"):  # the server closed (sealed) its log: what it accepted must all be there
        from features.eventlog import read_all
        from features.eventlog_file import FileEventLog

        log = FileEventLog(uri[len("file://"):])  # also seals a worker's file the terminate left behind
        result["events_in_log"] = len(read_all(log.reader(), idle_s=0.5))  # == accepted_total
        log.close()
        if event_log_seconds > 0:
            result["event_log_alone"] = bench_event_log_only(bcfg, tuple(concurrency), event_log_seconds, per_call,
                                                             progress=step)
    return result
