"""A full disk under a real server: SubmitSignals answers UNAVAILABLE (never INTERNAL) while the
event log cannot write, every signal acknowledged OK is in the log, the server recovers by itself
when space returns, and a signal retried after UNAVAILABLE counts (it is not dropped as a repeat)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc

from features.eventlog import read_all

from features.eventlog_file import FileEventLog
from core.events import parse_event
from serving.conftest import running_server, token
from serving.protos import pb, rpc

THREADS = 3
PER_CALL = 20
ACTIONS = (pb.VIEW, pb.CLICK, pb.LIKE, pb.SHARE)
UNLIMITED = {"FEEDRANK_SERVING_RATE_LIMIT_RPS": "100000", "FEEDRANK_SERVING_RATE_LIMIT_BURST": "100000",
             "FEEDRANK_SERVING_SIGNAL_RATE_LIMIT_RPS": "1000000", "FEEDRANK_SERVING_SIGNAL_RATE_LIMIT_BURST": "1000000"}


def test_full_disk_is_unavailable_then_recovers_with_every_ack_logged(served_world, small_disk: Path):
    events_dir = small_disk / "events"
    with running_server(served_world, FEEDRANK_EVENTS="file://" + str(events_dir), **UNLIMITED) as server:
        n_posts = int(server.state.catalog.count)
        admin = token(server.cfg, 0, admin=True)  # reports without prior exposures: the disk is what is tested
        ch = grpc.insecure_channel(server.address)
        stub = rpc.FeedServiceStub(ch)
        acked: set[tuple[int, int, str]] = set()
        codes: dict[str, int] = {}
        messages: list[str] = []
        lock = threading.Lock()
        phase = {"name": "full"}
        ballast = small_disk / "ballast"
        st = os.statvfs(small_disk)
        with open(ballast, "wb") as f:  # leave ~200 KB for the log: a few thousand signals fit
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 200_000))

        def request(t: int, i: int) -> pb.SubmitSignalsRequest:
            user = 1 + t
            return pb.SubmitSignalsRequest(user_id=user, signals=[
                pb.Signal(post_id=(i * PER_CALL + j) % n_posts, action=ACTIONS[(i * PER_CALL + j) // n_posts],
                          position=j + 1) for j in range(PER_CALL)])

        def send(req: pb.SubmitSignalsRequest) -> grpc.StatusCode:
            try:
                r = stub.SubmitSignals(req, metadata=admin, timeout=20)
            except grpc.RpcError as e:
                with lock:
                    codes[e.code().name] = codes.get(e.code().name, 0) + 1
                    if e.code() == grpc.StatusCode.UNAVAILABLE and len(messages) < 5:
                        messages.append(e.details() or "")
                return e.code()
            assert r.accepted == PER_CALL and not r.dropped, (r.accepted, dict(r.dropped))
            with lock:
                codes["OK"] = codes.get("OK", 0) + 1
                acked.update((req.user_id, s.post_id, pb.SignalAction.Name(s.action).lower()) for s in req.signals)
            return grpc.StatusCode.OK

        def run(t: int) -> None:
            i = 0
            while phase["name"] != "stop":
                req = request(t, i)
                code = send(req)
                while code == grpc.StatusCode.UNAVAILABLE and phase["name"] != "stop":
                    time.sleep(0.05)  # a client retries the same signals until they are accepted
                    code = send(req)
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), code
                i += 1

        ths = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(THREADS)]
        for th in ths:
            th.start()
        deadline = time.monotonic() + 120
        while codes.get("UNAVAILABLE", 0) < 30:
            assert time.monotonic() < deadline, f"the disk never filled: {codes}"
            assert all(th.is_alive() for th in ths), f"a client failed: {codes}"
            time.sleep(0.05)
        assert "No space left on device" in messages[0] and "retry" in messages[0], messages[0]
        ok_while_full = codes.get("OK", 0)

        ballast.unlink()  # space returns: the same server takes the retries and new calls, no restart
        deadline = time.monotonic() + 60
        while codes.get("OK", 0) < ok_while_full + 60:
            assert time.monotonic() < deadline, f"SubmitSignals did not recover after space returned: {codes}"
            assert all(th.is_alive() for th in ths), f"a client failed: {codes}"
            time.sleep(0.05)
        phase["name"] = "stop"
        for th in ths:
            th.join(timeout=30)
        assert set(codes) == {"OK", "UNAVAILABLE"}, codes  # never INTERNAL or UNKNOWN
        assert server.metrics.registry.get_sample_value(
            "feedrank_event_log_errors_total", {"rpc": "SubmitSignals"}) >= codes["UNAVAILABLE"]
        ch.close()
    # the server closed (sealed) its log; a fresh reader sees every acknowledged signal exactly once
    log = FileEventLog(events_dir)
    logged = [parse_event(x) for x in read_all(log.reader(), idle_s=0.5)]
    log.close()
    found = [(e.user_id, e.post_id, e.action) for e in logged if e.type == "engagement"]
    missing = acked - set(found)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged signals not in the log"
    assert len(found) == len(set(found)), "a signal answered UNAVAILABLE was logged as well as its retry"
    assert len(acked) >= (ok_while_full + 60) * PER_CALL
