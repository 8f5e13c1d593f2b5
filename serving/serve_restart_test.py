"""`feedrank serve --workers 2` as an operator runs it: Redis restarts under it, then a worker is
SIGKILLed; the supervisor's replacement starts (it gets the clock from the supervisor, not from a
Redis key the restart erased), no worker crash-loops, and the clock key is written back."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc
import psutil
import pytest

from runtime import stack
from core.services import free_port
from runtime.procs import stop_group
from serving.conftest import serve_process, token, wait_for
from serving.protos import pb, rpc
from serving.state import SERVING_CLOCK

pytestmark = pytest.mark.slow


def _serve_two_workers(served_world, cfg, port: int, tmp_path, **env_extra: str) -> tuple[subprocess.Popen, Path]:
    """`feedrank serve --workers 2 --world …` as an operator starts it, on ``cfg``'s stack; its log file."""
    out = tmp_path / "serve.log"
    return serve_process(served_world, cfg, port, out, "--workers", "2", **env_extra), out


def test_workers_survive_a_redis_restart_and_a_kill(served_world, tmp_path):
    from features.feast_repo import apply

    port = free_port()
    cfg = served_world.config(FEEDRANK_SERVING_PORT=str(port), FEEDRANK_SERVING_METRICS_PORT=str(free_port()))
    stack.up(cfg)
    apply(cfg).materialize(datetime(2020, 1, 1, tzinfo=timezone.utc), datetime(2030, 1, 1, tzinfo=timezone.utc),
                           feature_views=["user_topic"])
    proc, out = _serve_two_workers(served_world, cfg, port, tmp_path)
    try:
        wait_for("two workers", lambda: out.read_text().count("FeedService worker") >= 2, timeout=240)
        stub = rpc.FeedServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert stub.GetFeed(pb.GetFeedRequest(user_id=3), metadata=token(cfg, 3), timeout=20).items

        stack.down(cfg)
        stack.up(cfg)
        from features.connection import redis_client

        redis_client(cfg).delete(SERVING_CLOCK)  # as a restart without persistence would leave it
        workers = [c for c in psutil.Process(proc.pid).children() if "serve" in " ".join(c.cmdline())]
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        wait_for("the replacement worker", lambda: out.read_text().count("FeedService worker") >= 3, timeout=240)
        time.sleep(10)  # a crash-looping replacement would have exited again by now
        log = out.read_text()
        assert log.count("exited") == 1 and "KeyError" not in log, log[-3000:]
        assert wait_for("the clock key written back", lambda: redis_client(cfg).hgetall(SERVING_CLOCK), timeout=30)
        for u in range(10, 16):  # new connections: the kernel spreads them over both workers
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            r = rpc.FeedServiceStub(ch).GetFeed(pb.GetFeedRequest(user_id=u), metadata=token(cfg, u), timeout=20)
            assert r.items
            ch.close()
    finally:
        stop_group(proc)
        stack.down(cfg)


def test_a_worker_killed_in_a_burst_loses_no_acknowledged_signal(served_world, tmp_path):
    """file:// event log: SubmitSignals from 6 threads to `feedrank serve --workers 2`, SIGKILL of a
    worker mid-burst; every signal answered OK is in the log afterwards (its orphaned in-progress
    file is sealed by the surviving worker)."""
    import threading

    from features.eventlog import read_all

    from features.eventlog_file import FileEventLog
    from core.events import parse_event

    port = free_port()
    events_dir = tmp_path / "events"
    cfg = served_world.config(FEEDRANK_SERVING_PORT=str(port), FEEDRANK_SERVING_METRICS_PORT=str(free_port()),
                              FEEDRANK_EVENTS="file://" + str(events_dir))
    stack.up(cfg)
    proc, out = _serve_two_workers(served_world, cfg, port, tmp_path, FEEDRANK_EVENTS=cfg.events.uri)
    acked: list[str] = []
    failed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        wait_for("two workers", lambda: out.read_text().count("FeedService worker") >= 2, timeout=240)
        md = token(cfg, 1, admin=True)  # a service token: the posts need not have been served

        def burst(k: int) -> None:
            ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            stub = rpc.FeedServiceStub(ch)
            i = 0
            while not stop.is_set():
                rid = f"burst-{k}-{i}"
                sig = [pb.Signal(post_id=1 + j, action=pb.VIEW, request_id=rid) for j in range(5)]
                try:
                    r = stub.SubmitSignals(pb.SubmitSignalsRequest(user_id=100 + k * 100_000 + i, signals=sig),
                                           metadata=md, timeout=10)
                    with lock:
                        acked.append((rid, r.accepted))
                except grpc.RpcError:
                    with lock:
                        failed.append(rid)
                    ch.close()
                    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                    stub = rpc.FeedServiceStub(ch)
                i += 1
            ch.close()

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        wait_for("a few hundred acknowledged calls", lambda: len(acked) >= 300, timeout=60)
        # the worker that took the most of the burst (each serves its own metrics on metrics_port + index)
        import urllib.request

        def taken(i: int) -> float:
            url = f"http://127.0.0.1:{cfg.serving.metrics_port + i}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                       if ln.startswith("feedrank_rpcs_total{") and 'rpc="SubmitSignals"' in ln)

        busiest = max((0, 1), key=taken)
        assert taken(busiest) > 50
        victim = next(c for c in psutil.Process(proc.pid).children()
                      if c.cmdline()[-2:] == ["--worker-index", str(busiest)])
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop_group(proc)
        stack.down(cfg)
    log = FileEventLog(events_dir)  # seals what a dead writer left
    logged: dict[str, int] = {}
    for line in read_all(log.reader(), idle_s=1.0):
        e = parse_event(line)
        if e.type == "engagement" and e.request_id:
            logged[e.request_id] = logged.get(e.request_id, 0) + 1
    log.close()
    missing = [rid for rid, accepted in acked if logged.get(rid, 0) < accepted]
    assert len(acked) >= 300 and sum(a for _, a in acked) >= 1000 and not missing, (len(acked), len(failed), missing[:5])
    print(f"{len(acked)} calls acknowledged, {len(failed)} failed (the killed worker's), 0 missing")
