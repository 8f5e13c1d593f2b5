"""The seed 003 HTTP/JSON API over real HTTP (uvicorn in the server, requests as the client), on the
embedded stack, and schemathesis fuzzing it from its own /openapi.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from core.services import free_port
from serving.conftest import running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(served_world) -> Iterator[Any]:
    # no practical per-user limit: the fuzzer calls as one user (the limit's own test sets one)
    with running_server(served_world, FEEDRANK_SERVING_HTTP_PORT=str(free_port()),
                        FEEDRANK_SERVING_RATE_LIMIT_RPS="1000000", FEEDRANK_SERVING_RATE_LIMIT_BURST="1000000") as server:
        server.base = f"http://{server.cfg.serving.host}:{server.http.port}"
        yield server


def _auth(api, user: int, admin: bool = False) -> dict[str, str]:
    from serving.edge import config_token

    return {"Authorization": "Bearer " + config_token(api.cfg, user, admin, 600.0)}


def _users(api, n: int, offset: int) -> list[int]:
    g = api.state.graph
    return [u for u in range(200, 1500) if len(g.following(u)) >= 5][offset: offset + n]


def _error(r: requests.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] == code and body["message"], body
    return body["message"]


def test_feed_pages_follow_the_cursor_and_carry_ranking_metadata(api):
    u = _users(api, 1, 0)[0]
    r = requests.get(f"{api.base}/api/v1/feed", params={"type": "home", "limit": 10}, headers=_auth(api, u), timeout=10)
    assert r.status_code == 200, r.text
    first = r.json()
    assert [i["position"] for i in first["items"]] == list(range(1, 11))
    assert first["model_version"] and first["request_id"] and first["next_cursor"] and not first["degraded"]
    assert {i["source"] for i in first["items"]} <= {"IN_NETWORK", "OUT_OF_NETWORK", "AD", "TRENDING"}
    assert all(0.0 <= i["heads"]["click"] <= 1.0 for i in first["items"])
    r2 = requests.get(f"{api.base}/api/v1/feed", params={"cursor": first["next_cursor"], "limit": 10},
                      headers=_auth(api, u), timeout=10)
    second = r2.json()
    assert [i["position"] for i in second["items"]] == list(range(11, 21))
    assert second["request_id"] == first["request_id"]  # the same ranking, its next page
    assert not {i["post_id"] for i in first["items"]} & {i["post_id"] for i in second["items"]}
    # the same page over gRPC's rules: FOLLOWING is reverse-chronological, by followed authors only
    r3 = requests.get(f"{api.base}/api/v1/feed", params={"type": "following"}, headers=_auth(api, u), timeout=10)
    followed = set(api.state.graph.following(u))
    assert r3.status_code == 200 and all(i["author_id"] in followed for i in r3.json()["items"])


def test_auth_and_bad_input_are_4xx_with_a_json_message(api):
    u, other = _users(api, 2, 1)
    feed = f"{api.base}/api/v1/feed"
    _error(requests.get(feed, timeout=10), 401, "UNAUTHENTICATED")
    _error(requests.get(feed, headers={"Authorization": "Bearer nope"}, timeout=10), 401, "UNAUTHENTICATED")
    assert "cannot act as user" in _error(requests.get(feed, params={"user_id": other}, headers=_auth(api, u), timeout=10),
                                          403, "PERMISSION_DENIED")
    assert "type" in _error(requests.get(feed, params={"type": "sideways"}, headers=_auth(api, u), timeout=10),
                            400, "INVALID_ARGUMENT")
    assert "limit" in _error(requests.get(feed, params={"limit": 1000}, headers=_auth(api, u), timeout=10),
                             400, "INVALID_ARGUMENT")
    assert "cursor" in _error(requests.get(feed, params={"cursor": "forged"}, headers=_auth(api, u), timeout=10),
                              400, "INVALID_ARGUMENT")
    fb = f"{api.base}/api/v1/feed/feedback"
    assert "feedback_type" in _error(requests.post(fb, json={"post_id": 1}, headers=_auth(api, u), timeout=10),
                                     400, "INVALID_ARGUMENT")
    _error(requests.post(fb, data="{not json", headers={**_auth(api, u), "Content-Type": "application/json"},
                         timeout=10), 400, "INVALID_ARGUMENT")
    assert "post_id" in _error(requests.post(fb, json={"post_id": 10**9, "feedback_type": "hide"}, headers=_auth(api, u),
                                             timeout=10), 400, "INVALID_ARGUMENT")
    sig = f"{api.base}/api/v1/feed/signals"
    _error(requests.post(sig, json={"signals": [{"post_id": 1, "action": "teleport"}]}, headers=_auth(api, u),
                         timeout=10), 400, "INVALID_ARGUMENT")
    _error(requests.post(sig, json={"signals": [{"post_id": 1, "action": "view"}] * 501}, headers=_auth(api, u),
                         timeout=10), 400, "INVALID_ARGUMENT")
    debug = f"{api.base}/api/v1/feed/debug"
    _error(requests.get(debug, params={"user_id": u, "post_id": 1}, headers=_auth(api, u), timeout=10),
           403, "PERMISSION_DENIED")


def test_signals_feedback_and_debug_act_on_what_was_served(api):
    u = _users(api, 1, 3)[0]
    page = requests.get(f"{api.base}/api/v1/feed", headers=_auth(api, u), timeout=10).json()
    items = page["items"]
    shown, hidden = items[0], items[1]
    sig = requests.post(f"{api.base}/api/v1/feed/signals", headers=_auth(api, u), timeout=10, json={"signals": [
        {"post_id": shown["post_id"], "action": "click", "position": shown["position"], "request_id": page["request_id"]},
        {"post_id": shown["post_id"], "action": "click", "position": shown["position"], "request_id": page["request_id"]},
        {"post_id": 1 if 1 not in {i["post_id"] for i in items} else 2, "action": "like"}]})
    assert sig.status_code == 200, sig.text
    assert sig.json() == {"accepted": 1, "dropped": {"repeated": 1, "not_served": 1}}

    fb = requests.post(f"{api.base}/api/v1/feed/feedback", headers=_auth(api, u), timeout=10,
                       json={"post_id": hidden["post_id"], "feedback_type": "hide"})
    assert fb.status_code == 200 and fb.json() == {"accepted": True}
    for feed in ("home", "explore"):
        again = requests.get(f"{api.base}/api/v1/feed", params={"type": feed, "limit": 50}, headers=_auth(api, u),
                             timeout=10).json()
        assert hidden["post_id"] not in {i["post_id"] for i in again["items"]}

    post = items[2]["post_id"]
    d = requests.get(f"{api.base}/api/v1/feed/debug", params={"user_id": u, "post_id": post},
                     headers=_auth(api, u, admin=True), timeout=10)
    assert d.status_code == 200, d.text
    body = d.json()
    assert body["post_id"] == post and len(body["features"]) > 100 and body["model_version"]
    stages = [s["stage"] for s in body["stages"]]
    assert "HeavyRankerScorer" in stages and any(s.startswith("source:") for s in stages)
    assert 0.0 < body["heads"]["click"] < 1.0


def test_the_rate_limit_is_429_with_retry_after(api):
    from serving.edge import SharedRateLimiter

    u = _users(api, 1, 5)[0]
    codes = []
    limiter, api.service.limiter = api.service.limiter, SharedRateLimiter(api.state.redis, 5.0, 10, "feed-http-test")
    try:
        with requests.Session() as s:
            for _ in range(16):  # burst 10 at 5/s: the window holds 10 calls per 2 s
                r = s.get(f"{api.base}/api/v1/feed", params={"type": "following"}, headers=_auth(api, u), timeout=10)
                codes.append(r.status_code)
                if r.status_code == 429:
                    assert r.headers["Retry-After"] == "1" and r.json()["error"] == "RESOURCE_EXHAUSTED"
    finally:
        api.service.limiter = limiter
    assert codes.count(200) >= 10 and 429 in codes, codes


def test_openapi_lists_every_seed_endpoint_and_health_reports_ready(api):
    spec = requests.get(f"{api.base}/openapi.json", timeout=10).json()
    assert {"/api/v1/feed", "/api/v1/feed/signals", "/api/v1/feed/feedback", "/api/v1/feed/debug"} <= set(spec["paths"])
    assert set(spec["paths"]["/api/v1/feed"]["get"]["responses"]) >= {"200", "400", "401", "403", "429"}
    assert requests.get(f"{api.base}/healthz", timeout=10).json() == {"status": "SERVING"}


def test_fuzzing_the_api_from_its_openapi_document_finds_no_server_error(api, tmp_path: Path):
    """schemathesis generates valid and invalid requests for every operation (an admin token, so the
    calls get past authentication into validation and the funnel); no response may be a 5xx, and
    every response must match the documented status codes and schemas."""
    u = _users(api, 1, 7)[0]
    token = _auth(api, u, admin=True)["Authorization"]
    report = tmp_path / "schemathesis.json"
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{api.base}/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
           "-H", f"Authorization: {token}", "--max-examples", "40", "--seed", "1", "--workers", "1",
           "--phases", "examples,coverage,fuzzing", "--report", "json", "--report-json-path", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache there too
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert cases and int(cases[1]) >= 200 and cases[1] == cases[2], out.stdout[-2000:]  # 526 with seed 1
    assert report.exists() and json.loads(report.read_text())
