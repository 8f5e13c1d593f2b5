"""`feedrank bench soak`: does the server's memory stay flat under ordinary traffic?

The stack is the one of ``bench serve`` (:func:`lab.bench_serve.serving_stack`: isolated Redis,
model store and event log, ``feedrank serve --world`` as its own processes). The load is open
loop (requests scheduled at fixed rates, latency measured from the scheduled time) and looks
like a population of users:

- GetFeed (HOME) at ``getfeed_rps``, each for a user drawn from the world's users with follows,
  with that user's own HS256 token, over 16 connections (a user always on the same one); 30% of
  the calls for a user who has a next-page cursor ask for that page, the rest for a first page.
- SubmitSignals at ``signals_rps``, each with 1-5 signals (VIEW, CLICK, DWELL with dwell_ms,
  position and request_id from the page) about items GetFeed actually served to that same user
  at least a second before, in the order a client sends them (VIEW, then CLICK, then DWELL of
  one item). The server drops signals about posts it never served to that user, so these are
  the signals a real client sends; accepted and dropped (by reason) are reported.

Every ``sample_s`` seconds the RSS of each worker process (the ``feedrank serve`` supervisor's
children; with one worker, the server itself) and of the supervisor is sampled, with each
worker's ``feedrank_ranking_cache_bytes``. The goal: RSS growth after the warm-up (the first
5 minutes; the first third of the run when it is shorter than 10 minutes) at most 5%, and
no answer but OK (RESOURCE_EXHAUSTED counts as an error).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import Config
from lab.bench import quantiles

Step = Callable[[str, float], None]

GOAL = {"rss_growth_max": 0.05, "errors": 0}
WARMUP_S = 300.0          # the first 5 minutes (runs of 10 minutes or more)
CONNECTIONS = 16          # client connections; a user's calls always use the same one (the kernel spreads
                          # connections over the workers sharing the port, so one connection = one worker)
SERVED_KEEP = 2000        # pages remembered for signals (~100 s of GetFeed at 20/s)
SIGNAL_MIN_AGE_S = 1.0    # a client reports on a page it has had on screen for a while
SIGNALS_START_S = 2.0     # the signal schedule starts once the first pages are that old
NEXT_PAGE_SHARE = 0.3     # GetFeed calls asking for the next page of the user's last ranking
ACTIONS = ("VIEW", "CLICK", "DWELL")  # per item, in the order a client reports them


class _Page:
    """One page GetFeed served: what a client may report signals about."""

    __slots__ = ("t", "user", "request_id", "items", "sent")

    def __init__(self, t: float, user: int, request_id: str, items: list[tuple[int, int]]):
        self.t, self.user, self.request_id, self.items = t, user, request_id, items  # items: (post_id, position)
        self.sent = [0] * len(items)  # per item: how many of ACTIONS were reported already


class _RpcStats:
    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.lat_ok: list[float] = []
        self.lat_all: list[float] = []

    def add(self, code: str, ms: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        self.lat_all.append(ms)
        if code == "OK":
            self.lat_ok.append(ms)

    def summary(self) -> dict[str, Any]:
        return {"requests": len(self.lat_all), "codes": dict(sorted(self.codes.items())),
                "errors": sum(n for c, n in self.codes.items() if c != "OK"),
                "latency_ms": quantiles(self.lat_ok), "latency_ms_all_requests": quantiles(self.lat_all)}


class SoakLoad:
    """The open-loop GetFeed + SubmitSignals traffic of a user population (see the module doc)."""

    def __init__(self, address: str, secret: str, users: np.ndarray, getfeed_rps: float, signals_rps: float,
                 token_ttl_s: float = 3600.0, seed: int = 0):
        import grpc

        from serving.protos import pb, rpc

        self.pb, self.grpc = pb, grpc
        self.users, self.getfeed_rps, self.signals_rps = users, getfeed_rps, signals_rps
        self.secret, self.token_ttl_s = secret, token_ttl_s
        self.rng = np.random.default_rng(seed)
        # own subchannel pools: grpc would otherwise share one TCP connection between same-target channels
        self.channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(CONNECTIONS)]
        self.stubs = [rpc.FeedServiceStub(c) for c in self.channels]
        self.lock = threading.Lock()
        self.tokens: dict[int, tuple[float, list[tuple[str, str]]]] = {}
        self.cursors: dict[int, str] = {}
        self.served: deque[_Page] = deque(maxlen=SERVED_KEEP)
        self.stats = {"GetFeed": _RpcStats(), "SubmitSignals": _RpcStats()}
        self.feed_extra = {"degraded": 0, "from_cache": 0, "next_page_requests": 0, "empty_pages": 0}
        self.sig = {"signals_sent": 0, "accepted": 0, "dropped": {}, "by_action": {a: 0 for a in ACTIONS},
                    "calls_skipped_nothing_served": 0}

    def _meta(self, user: int) -> list[tuple[str, str]]:
        from serving.edge import make_token

        now = time.time()
        with self.lock:
            got = self.tokens.get(user)
            if got is None or now - got[0] > self.token_ttl_s / 2:  # renewed well before it expires
                got = (now, [("authorization", "Bearer " + make_token(self.secret, user, ttl_s=self.token_ttl_s))])
                self.tokens[user] = got
        return got[1]

    # ------------------------------------------------------------------ the two calls
    def _get_feed(self, sched: float, user: int, next_page: bool) -> None:
        pb = self.pb
        with self.lock:
            cursor = self.cursors.get(user, "") if next_page else ""
            if cursor:
                self.feed_extra["next_page_requests"] += 1
        code = "OK"
        try:
            r = self.stubs[user % len(self.stubs)].GetFeed(pb.GetFeedRequest(user_id=user, feed_type=pb.HOME, cursor=cursor),
                                                         metadata=self._meta(user), timeout=5)
        except self.grpc.RpcError as e:
            code, r = e.code().name, None
        ms = (time.perf_counter() - sched) * 1000
        with self.lock:
            self.stats["GetFeed"].add(code, ms)
            if r is None:
                return
            self.feed_extra["degraded"] += int(r.degraded)
            self.feed_extra["from_cache"] += int(r.from_cache)
            if r.next_cursor:
                self.cursors[user] = r.next_cursor
            else:
                self.cursors.pop(user, None)
            if r.items:
                self.served.append(_Page(time.monotonic(), user, r.request_id,
                                         [(int(it.post_id), int(it.position)) for it in r.items]))
            else:
                self.feed_extra["empty_pages"] += 1

    def _pick_signals(self, rnd: random.Random) -> tuple[int, list[Any]] | None:
        """(user, 1-5 signals) about a page served to that user, each (item, action) reported once."""
        pb = self.pb
        with self.lock:
            n = len(self.served)
            fresh, cutoff = 0, time.monotonic() - SIGNAL_MIN_AGE_S
            while fresh < n and self.served[n - 1 - fresh].t > cutoff:
                fresh += 1
            if n - fresh <= 0:
                return None
            for _ in range(5):  # a page with nothing left to report: try another
                page = self.served[rnd.randrange(n - fresh)]
                open_items = [k for k in range(len(page.items)) if page.sent[k] < len(ACTIONS)]
                if not open_items:
                    continue
                want = rnd.randint(1, 5)
                signals = []
                while open_items and len(signals) < want:
                    # the top of a page is looked at more (examination ~ 1/position)
                    k = rnd.choices(open_items, weights=[1.0 / (1 + k) for k in open_items])[0]
                    action = ACTIONS[page.sent[k]]
                    page.sent[k] += 1
                    if page.sent[k] >= len(ACTIONS) or (action == "VIEW" and rnd.random() < 0.5):
                        open_items.remove(k)  # half the views are not clicked in this call
                    post, pos = page.items[k]
                    signals.append(pb.Signal(post_id=post, action=getattr(pb, action), position=pos,
                                             request_id=page.request_id,
                                             dwell_ms=rnd.randint(800, 30_000) if action == "DWELL" else 0))
                    self.sig["by_action"][action] += 1
                return page.user, signals
        return None

    def _submit_signals(self, sched: float, seed: int) -> None:
        picked = self._pick_signals(random.Random(seed))
        if picked is None:
            with self.lock:
                self.sig["calls_skipped_nothing_served"] += 1
            return
        user, signals = picked
        code = "OK"
        try:
            r = self.stubs[user % len(self.stubs)].SubmitSignals(self.pb.SubmitSignalsRequest(user_id=user, signals=signals),
                                                               metadata=self._meta(user), timeout=5)
        except self.grpc.RpcError as e:
            code, r = e.code().name, None
        ms = (time.perf_counter() - sched) * 1000
        with self.lock:
            self.stats["SubmitSignals"].add(code, ms)
            self.sig["signals_sent"] += len(signals)
            if r is not None:
                self.sig["accepted"] += int(r.accepted)
                for reason, k in r.dropped.items():
                    self.sig["dropped"][reason] = self.sig["dropped"].get(reason, 0) + int(k)

    # ------------------------------------------------------------------ the schedule
    def run(self, seconds: float, tick: Callable[[float], None] | None = None, t0: float | None = None) -> None:
        """Both schedules, merged, for ``seconds`` from ``t0`` (perf_counter; default: now + 0.2 s);
        signals from ``SIGNALS_START_S`` on."""
        t0 = time.perf_counter() + 0.2 if t0 is None else t0
        start_sig = min(SIGNALS_START_S, seconds / 2)
        n_feed = int(self.getfeed_rps * seconds)
        n_sig = int(self.signals_rps * (seconds - start_sig))
        i = j = 0
        last_tick = 0.0
        with ThreadPoolExecutor(max_workers=64) as pool:
            while i < n_feed or j < n_sig:
                t_feed = t0 + i / self.getfeed_rps if i < n_feed else float("inf")
                t_sig = t0 + start_sig + j / self.signals_rps if j < n_sig else float("inf")
                sched = min(t_feed, t_sig)
                delay = sched - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                if t_feed <= t_sig:
                    user = int(self.users[self.rng.integers(self.users.size)])
                    pool.submit(self._get_feed, sched, user, bool(self.rng.random() < NEXT_PAGE_SHARE))
                    i += 1
                else:
                    pool.submit(self._submit_signals, sched, int(self.rng.integers(1 << 62)))
                    j += 1
                now = time.perf_counter()
                if tick is not None and now - last_tick >= 1.0:
                    tick(min(1.0, (now - t0) / seconds))
                    last_tick = now

    def close(self) -> None:
        for c in self.channels:
            c.close()

    def summary(self) -> dict[str, Any]:
        with self.lock:
            feed = {**self.stats["GetFeed"].summary(), **self.feed_extra}
            sig = {**self.stats["SubmitSignals"].summary(), **self.sig, "dropped": dict(sorted(self.sig["dropped"].items()))}
        sent = sig["signals_sent"]
        sig["accepted_share"] = round(sig["accepted"] / sent, 4) if sent else None
        return {"GetFeed": feed, "SubmitSignals": sig}


# ---------------------------------------------------------------------------- memory samples
def _worker_processes(sup: Any, n_workers: int) -> dict[str, Any]:
    """{"worker<i>": psutil.Process}: the supervisor's children by their --worker-index; with one
    worker the supervisor serves itself."""
    import psutil

    if n_workers == 1:
        return {"worker0": sup}
    out = {}
    for c in sup.children():
        try:
            argv = c.cmdline()
        except psutil.Error:
            continue
        if "--worker-index" in argv:
            out[f"worker{argv[argv.index('--worker-index') + 1]}"] = c
    return out


def _rss_mb(p: Any) -> float | None:
    """RSS of a process and its descendants (MB), None when it is gone."""
    import psutil

    try:
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _cache_mb(port: int) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("feedrank_ranking_cache_bytes"):
            return round(float(line.rpartition(" ")[2]) / 2**20, 2)
    return None


class MemorySampler:
    """Every ``every_s``: RSS of each worker and of the supervisor, each worker's ranking cache."""

    def __init__(self, sup_pid: int, n_workers: int, metrics_ports: list[int], every_s: float = 10.0):
        import psutil

        self.sup = psutil.Process(sup_pid)
        self.n_workers, self.ports, self.every_s = n_workers, metrics_ports, every_s
        self.samples: list[dict[str, Any]] = []
        self.pids: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0

    def sample(self) -> dict[str, Any]:
        workers = _worker_processes(self.sup, self.n_workers)
        rss: dict[str, float | None] = {}
        for name in sorted(workers, key=lambda w: int(w[len("worker"):])):
            p = workers[name]
            if name in self.pids and self.pids[name] != p.pid:
                self.restarts[name] = self.restarts.get(name, 0) + 1
            self.pids[name] = p.pid
            rss[name] = _rss_mb(p)
        if self.n_workers > 1:
            try:
                rss["supervisor"] = self.sup.memory_info().rss / 2**20
            except Exception:  # noqa: BLE001 - gone: the run fails on its errors anyway
                rss["supervisor"] = None
        cache = {f"worker{i}": _cache_mb(port) for i, port in enumerate(self.ports)}
        s = {"t_s": round(max(0.0, time.perf_counter() - self.t0), 1),
             "rss_mb": {k: (round(v, 1) if v is not None else None) for k, v in rss.items()},
             "total_mb": round(sum(v for v in rss.values() if v is not None), 1),
             "ranking_cache_mb": cache}
        self.samples.append(s)
        return s

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.sample()

        def loop() -> None:
            k = 1
            while not self._stop.wait(max(0.0, self.t0 + k * self.every_s - time.perf_counter())):
                self.sample()
                k += 1

        self._thread = threading.Thread(target=loop, name="soak-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()  # the end of the run


def warmup_seconds(minutes: float) -> tuple[float, str]:
    if minutes >= 10:
        return WARMUP_S, "the first 5 minutes"
    return minutes * 60 / 3, "the first third of the run (the run is shorter than 10 minutes)"


def rss_growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """(RSS at the end - RSS at the warm-up boundary) / RSS at the boundary: of the total and of
    each process. The boundary sample is the first one at or after ``warmup_s``."""
    at = next((s for s in samples if s["t_s"] >= warmup_s), samples[-1])
    end = samples[-1]
    after = [s for s in samples if s["t_s"] >= at["t_s"]]

    def g(a: float | None, b: float | None) -> float | None:
        return round((b - a) / a, 4) if a and b is not None else None

    per = {k: g(at["rss_mb"].get(k), end["rss_mb"].get(k)) for k in end["rss_mb"]}
    peak = max(s["total_mb"] for s in after)
    return {"total": g(at["total_mb"], end["total_mb"]), "per_process": per,
            "warmup_sample_t_s": at["t_s"], "end_sample_t_s": end["t_s"],
            "total_mb_at_warmup": at["total_mb"], "total_mb_at_end": end["total_mb"],
            "total_mb_peak_after_warmup": peak, "peak_growth_after_warmup": g(at["total_mb"], peak)}


def bench_soak(cfg: Config, scale: str = "small", minutes: float = 30.0, getfeed_rps: float = 20.0,
               signals_rps: float = 10.0, workers: int = 0, progress: Step | None = None,
               world_dir: Path | None = None, sample_s: float = 10.0) -> dict[str, Any]:
    from lab.bench_serve import serving_stack

    step = progress or (lambda s, f: None)
    seconds = minutes * 60
    warmup_s, warmup_rule = warmup_seconds(minutes)
    with serving_stack(cfg, scale, workers, step, world_dir, name="soak") as st:
        world = st.world
        has_follows = np.flatnonzero(np.bincount(world.follow_src, minlength=world.n_users) > 0)
        users = np.random.default_rng(1).choice(has_follows, min(100_000, has_follows.size), replace=False)
        load = SoakLoad(st.address, st.bcfg.serving.jwt_secret, users, getfeed_rps, signals_rps,
                        token_ttl_s=min(3600.0, float(st.bcfg.serving.jwt_max_lifetime_s)))
        sampler = MemorySampler(st.proc.pid, st.workers, st.metrics_ports, sample_s)
        stage = f"soak: {minutes:g} min at {getfeed_rps:g} GetFeed + {signals_rps:g} SubmitSignals /s"
        step(stage, 0.0)
        t0 = time.perf_counter() + 0.2
        sampler.start(t0)
        try:
            load.run(seconds, tick=lambda f: step(stage, f), t0=t0)
        finally:
            sampler.stop()
            load.close()
        step(stage, 1.0)
        server_alive = st.proc.poll() is None
        rpcs = load.summary()
        samples = sampler.samples
        result: dict[str, Any] = {
            "scale": scale, "world": str(st.world_dir), "posts": int(world.n_posts), "users": int(world.n_users),
            "follows": int(world.follow_src.size), "models": st.versions, "server_startup_s": round(st.startup_s, 1),
            "parameters": {"minutes": minutes, "getfeed_rps": getfeed_rps, "signals_rps": signals_rps,
                           "workers": st.workers, "sample_s": sample_s, "signals_per_call": [1, 5],
                           "user_population": int(users.size), "next_page_share": NEXT_PAGE_SHARE,
                           "ranking_cache_mb_cap_per_worker": st.bcfg.serving.ranking_cache_mb,
                           "event_log": st.bcfg.events.uri.split(":")[0]},
        }
    errors = {rpc: r["errors"] for rpc, r in rpcs.items()}
    growth = rss_growth(samples, warmup_s)
    restarts = sum(sampler.restarts.values())
    ok_growth = growth["total"] is not None and growth["total"] <= GOAL["rss_growth_max"]
    ok_errors = sum(errors.values()) == GOAL["errors"]
    result.update({
        "warmup": {"seconds": round(warmup_s, 1), "rule": warmup_rule},
        "samples": samples,
        "rss_growth_after_warmup": growth,
        "ranking_cache_mb_at_end": samples[-1]["ranking_cache_mb"],
        "rpcs": rpcs,
        "signals": {"sent": rpcs["SubmitSignals"]["signals_sent"], "accepted": rpcs["SubmitSignals"]["accepted"],
                    "dropped": rpcs["SubmitSignals"]["dropped"]},
        "errors": {"total": sum(errors.values()), "by_rpc": errors},
        "worker_restarts": dict(sampler.restarts), "server_alive_at_end": server_alive,
        "goal": GOAL,
        "passed": {"rss_growth": ok_growth, "errors": ok_errors,
                   "no_worker_restarts": restarts == 0 and server_alive,  # a restart resets RSS: no evidence then
                   "all": ok_growth and ok_errors and restarts == 0 and server_alive},
    })
    if minutes < 30:
        result["note"] = f"a {minutes:g}-minute run: the acceptance run is `feedrank bench soak --minutes 30`"
    return result


# ---------------------------------------------------------------------------- output
def plot_soak(result: dict[str, Any], path: Path) -> Path:
    """Top: RSS per worker, of the supervisor and the total vs time, the warm-up boundary, each
    worker's ranking cache (and its cap) on a second axis. Bottom: RSS relative to the warm-up
    sample, with the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t_s"] / 60 for s in samples]
    names = list(samples[-1]["rss_mb"])
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, (ax, axg) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for name in names:
        ax.plot(t, [s["rss_mb"].get(name) for s in samples], marker=".", color=colors[name], label=f"{name} RSS")
    if len(names) > 1:
        ax.plot(t, [s["total_mb"] for s in samples], color="black", lw=2, label="total RSS")
    w = result["warmup"]["seconds"] / 60
    for a in (ax, axg):
        a.axvline(w, color="grey", ls=":", label=f"end of warm-up ({w:.3g} min)" if a is ax else None)
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    cap = result["parameters"]["ranking_cache_mb_cap_per_worker"]
    for name in samples[-1]["ranking_cache_mb"]:
        ax2.plot(t, [s["ranking_cache_mb"].get(name) for s in samples], ls="--", color=colors.get(name, "grey"),
                 label=f"{name} ranking cache")
    ax2.axhline(cap, color="red", ls="--", lw=0.8, label=f"ranking cache cap ({cap} MB per worker)")
    ax2.set_ylabel("ranking cache (MB)")
    ax2.set_ylim(bottom=0, top=max([cap] + [v or 0 for s in samples for v in s["ranking_cache_mb"].values()]) * 1.15)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    g = result["rss_growth_after_warmup"]
    p = result["parameters"]
    title = (f"soak: {p['getfeed_rps']:g} GetFeed + {p['signals_rps']:g} SubmitSignals /s for {p['minutes']:g} min, "
             f"{p['workers']} workers, {result['errors']['total']} errors")
    if g["total"] is not None:
        title += f"; total RSS growth after warm-up {g['total']:+.1%}"
    ax.set_title(title, fontsize=10)
    base = next((s for s in samples if s["t_s"] >= g["warmup_sample_t_s"]), samples[-1])
    for name in names:
        b = base["rss_mb"].get(name)
        axg.plot(t, [(s["rss_mb"].get(name) / b - 1) * 100 if b and s["rss_mb"].get(name) else None for s in samples],
                 color=colors[name], lw=1)
    if len(names) > 1:
        axg.plot(t, [(s["total_mb"] / base["total_mb"] - 1) * 100 for s in samples], color="black", lw=2)
    axg.axhline(result["goal"]["rss_growth_max"] * 100, color="red", ls="--", lw=0.8, label="goal (growth after warm-up)")
    axg.axhline(0, color="grey", lw=0.5)
    lo, hi = axg.get_ylim()
    axg.set_ylim(min(lo, -1.0), max(hi, result["goal"]["rss_growth_max"] * 100 * 1.4))
    axg.set_ylabel("RSS vs warm-up end (%)")
    axg.set_xlabel("minutes")
    axg.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_soak(result: dict[str, Any], out_dir: Path | None = None) -> tuple[Path, Path]:
    """``soak-<stamp>.json`` (+ .md) via :func:`lab.bench.write_result` and ``soak-<stamp>.png`` next to it."""
    from lab.bench import write_result

    path = write_result("soak", result, out_dir)
    png = plot_soak(result, path.with_suffix(".png"))
    data = json.loads(path.read_text())
    data["plot"] = png.name
    path.write_text(json.dumps(data, indent=2))
    md = path.with_suffix(".md")
    md.write_text(md.read_text() + f"\n![RSS over the soak]({png.name})\n")
    return path, png
