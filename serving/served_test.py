"""DebugRanking of served items: a post explained as a past request served it (by request id or cursor),
with the features it was served with, over real HTTP and gRPC on the embedded stack; and the /debug
page in Debian's headless Chromium driven by Selenium."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from core.events import FeaturesServed, parse_event
from core.schema import HEAD_NAMES, HEAVY_NAMES
from core.services import free_port
from features.eventlog import read_all
from serving.conftest import running_server, world_clock

pytestmark = pytest.mark.slow
HOUR_MS = 3_600_000
REPO = Path(__file__).resolve().parents[1]


class ShiftedClock:
    """The world's clock, movable forward: "an hour later" without waiting an hour."""

    def __init__(self, end_ms: int):
        self.base, self.offset_ms = world_clock(end_ms), 0

    def __call__(self) -> int:
        return self.base() + self.offset_ms


@pytest.fixture(scope="module")
def api(served_world) -> Iterator[Any]:
    clock = ShiftedClock(served_world.end_ms)
    with running_server(served_world, clock=clock, FEEDRANK_SERVING_HTTP_PORT=str(free_port())) as server:
        server.base = f"http://{server.cfg.serving.host}:{server.http.port}"
        server.clock = clock
        yield server


def _auth(api, user: int, admin: bool = False) -> dict[str, str]:
    from serving.edge import config_token

    return {"Authorization": "Bearer " + config_token(api.cfg, user, admin, 600.0)}


def _user(api, offset: int) -> int:
    g = api.state.graph
    return [u for u in range(300, 1500) if len(g.following(u)) >= 5][offset]


def _feed(api, user: int, **params: Any) -> dict[str, Any]:
    r = requests.get(f"{api.base}/api/v1/feed", params={"type": "home", "limit": 10, **params},
                     headers=_auth(api, user), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _explain(api, user: int, post: int, **params: Any) -> requests.Response:
    return requests.get(f"{api.base}/api/v1/feed/debug", params={"user_id": user, "post_id": post, **params},
                        headers=_auth(api, 1, admin=True), timeout=30)


def _features_served(api, request_id: str) -> list[FeaturesServed]:
    """The request's FeaturesServed events in the event log: the exact float32 rows the lake job archives."""
    api.service.feeds.effects.drain()
    evs = [e for e in (parse_event(x) for x in read_all(api.state.events.reader(), idle_s=0.5))
           if e.type == "features_served" and e.request_id == request_id]
    assert evs
    return evs


def _served_rows(api, request_id: str) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for e in _features_served(api, request_id):
        x = FeaturesServed.decode_rows(e.rows, e.n_features)
        out.update({p: x[i] for i, p in enumerate(e.post_ids)})
    return out


def _archive(api, request_id: str) -> None:
    """The request's features_served events into the lake, as the lake job writes them (jobs/lake_test.py
    runs that job itself; here only the rows matter)."""
    from features import lake

    lake.write_rows(api.cfg, "features_served", [lake.row_of("features_served", e) for e in _features_served(api, request_id)])


def test_an_hour_old_served_post_is_explained_with_the_features_it_was_served_with(api):
    from features.snapshots import KEY as SNAPSHOT_KEY

    u = _user(api, 0)
    page1 = _feed(api, u)
    page2 = _feed(api, u, cursor=page1["next_cursor"])
    rid = page1["request_id"]
    rows = _served_rows(api, rid)
    item = page1["items"][2]  # position 3
    post = item["post_id"]

    # two pages recorded (no shadow candidate runs: no page is counted as shadow-scored)
    assert api.metrics.served_records._value.get() >= 2 and api.metrics.shadow_pages._value.get() == 0

    # at once: the served record and the Redis snapshot (float16) of the page's rows
    r = _explain(api, u, post, request_id=rid)
    assert r.status_code == 200, r.text
    now = r.json()
    assert now["request_id"] == rid and now["served"] and now["position"] == 3 == item["position"]
    assert now["features_from"] == "snapshot"
    x = np.array([now["features"][n] for n in HEAVY_NAMES], dtype=np.float32)
    np.testing.assert_allclose(x, rows[post], rtol=2e-3, atol=1e-3)
    assert [i["post_id"] for i in now["page"]] == [i["post_id"] for i in page1["items"]]
    assert [i["position"] for i in now["page"]] == list(range(1, 11))

    # an hour later: the snapshot has expired (serving.snapshot_ttl_s = 1 h) and the lake job has archived
    # the page; the post's features have moved on (it is an hour older), the explanation has not
    api.state.redis.client.delete(SNAPSHOT_KEY.format(f"{rid}:1"))
    api.clock.offset_ms += HOUR_MS + 60_000
    gone = _explain(api, u, post, request_id=rid).json()  # before the lake job has archived it: said, not faked
    assert gone["features_from"] == "unavailable" and gone["features"] == {} and "expired" in " ".join(gone["notes"])
    assert gone["position"] == 3 and gone["heads"]["click"] == pytest.approx(item["heads"]["click"], abs=1e-7)
    # a lake file that cannot be read is said in the answer, not an error, and nothing is re-scored
    from features import lake

    day, hour = lake.partition(gone["served_ms"])
    bad = lake.lake_dir(api.cfg) / "features_served" / f"dt={day}" / f"hr={hour}" / "part-unreadable.parquet"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not parquet")
    broken = _explain(api, u, post, request_id=rid)
    assert broken.status_code == 200, broken.text
    notes = " ".join(broken.json()["notes"])
    assert broken.json()["features_from"] == "unavailable" and "lake not readable" in notes
    assert "not re-scored" not in notes and broken.json()["rescored"] is None
    bad.unlink()
    _archive(api, rid)
    old = _explain(api, u, post, request_id=rid).json()
    assert old["features_from"] == "lake" and old["position"] == 3
    served = np.array([old["features"][n] for n in HEAVY_NAMES], dtype=np.float32)
    np.testing.assert_array_equal(served, rows[post])  # exact: the lake keeps float32
    heads = [item["heads"][h] for h in HEAD_NAMES]
    np.testing.assert_allclose([old["heads"][h] for h in HEAD_NAMES], heads, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([old["rescored"][h] for h in HEAD_NAMES], heads, rtol=1e-5, atol=1e-6)
    assert old["score"] == pytest.approx(item["score"], rel=1e-6)
    parts = old["weighted"]
    assert set(parts) == {*HEAD_NAMES, "adjustments"} and sum(parts.values()) == pytest.approx(old["score"], abs=1e-5)
    assert old["model_version"] == page1["model_version"] and old["served_ms"] < api.clock() - HOUR_MS
    fresh = _explain(api, u, post).json()  # a fresh ranking now: different features (the post aged an hour)
    assert fresh["features_from"] == "fresh" and not fresh["request_id"]
    assert not np.array_equal(np.array([fresh["features"][n] for n in HEAVY_NAMES], dtype=np.float32), served)

    # the funnel's counts and the post's journey through it, as the ranking ran
    funnel = {f["stage"]: f for f in old["funnel"]}
    light_cut = funnel["TopKSelector(light_score)"]  # light_k organic candidates, and the ads (ranked apart)
    assert api.cfg.funnel.light_k <= light_cut["candidates_out"] < light_cut["candidates_in"]
    assert funnel["RerankSelector"]["candidates_out"] >= 20
    journey = {s["stage"]: s for s in old["stages"]}
    light = journey["TopKSelector(light_score)"]
    assert light["decision"] == "selected" and 1 <= light["rank"] <= api.cfg.funnel.light_k
    assert journey["RerankSelector"]["rank"] == 3 and "by score alone" in journey["RerankSelector"]["detail"]
    assert old["score_order"] >= 1 and set(old["reasons"]) == set(old["reasons"]) & {
        "out_of_network_quota", "exploration", "freshness_quota", "sponsored", "ad_slot"}

    # page 2 by its cursor's request (a plain cursor page: the counts are the ranking's, from page 1)
    p2 = page2["items"][0]
    by_cursor = _explain(api, u, p2["post_id"], cursor=page1["next_cursor"]).json()
    assert by_cursor["request_id"] == rid and by_cursor["position"] == 11 and by_cursor["funnel"] == old["funnel"]


def test_explaining_what_was_not_served_is_404_and_bad_requests_are_4xx(api):
    u, other = _user(api, 1), _user(api, 2)
    page = _feed(api, u)
    rid, post = page["request_id"], page["items"][0]["post_id"]
    api.service.feeds.effects.drain()
    unserved = next(p for p in range(1, 500) if p not in {i["post_id"] for i in page["items"]})
    r = _explain(api, u, unserved, request_id=rid)
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND" and "positions 1-10" in r.json()["message"]
    r = _explain(api, u, post, request_id="0" * 32)
    assert r.status_code == 404 and "no served record" in r.json()["message"]
    r = _explain(api, other, post, request_id=rid)
    assert r.status_code == 404 and "another user" in r.json()["message"]
    r = _explain(api, u, post, request_id=rid, cursor=page["next_cursor"])
    assert r.status_code == 400 and "give one of them" in r.json()["message"]
    r = _explain(api, u, post, cursor="not-a-cursor")
    assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT"
    r = requests.get(f"{api.base}/api/v1/feed/debug", params={"user_id": u, "post_id": post, "request_id": rid},
                     headers=_auth(api, u), timeout=10)  # not admin
    assert r.status_code == 403


def test_debug_ranking_by_request_over_grpc(api):
    import grpc

    from serving.protos import pb, rpc

    u = _user(api, 3)
    page = _feed(api, u)
    api.service.feeds.effects.drain()
    item = page["items"][4]
    with grpc.insecure_channel(api.address) as ch:
        got = rpc.FeedServiceStub(ch).DebugRanking(
            pb.DebugRankingRequest(user_id=u, post_id=item["post_id"], request_id=page["request_id"]),
            metadata=[("authorization", _auth(api, 1, admin=True)["Authorization"])], timeout=30)
    assert got.position == 5 and got.request_id == page["request_id"] and got.features_from == "snapshot"
    assert pb.Source.Name(got.source) == item["source"] and len(got.features) == len(HEAVY_NAMES)


def test_the_debug_page_in_headless_chromium(api, tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from serving.edge import config_token

    u = _user(api, 4)
    page = _feed(api, u)
    api.service.feeds.effects.drain()
    item = page["items"][2]
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2400"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(f"{api.base}/debug")
        assert "Why this post" in driver.find_element(By.TAG_NAME, "h1").text
        for field, value in (("token", config_token(api.cfg, 1, True, 600.0)), ("user_id", u),
                             ("post_id", item["post_id"]), ("request_id", page["request_id"])):
            driver.find_element(By.ID, field).send_keys(str(value))
        driver.find_element(By.ID, "explain").click()
        loaded = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded")  # noqa: E731
        WebDriverWait(driver, 20).until(lambda d: loaded(d) == str(item["post_id"]))
        assert driver.find_element(By.ID, "summary-position").text == "3"
        assert driver.find_element(By.ID, "summary-request").text == page["request_id"]
        assert driver.find_element(By.ID, "summary-features-from").text == "snapshot"
        highlighted = driver.find_elements(By.CSS_SELECTOR, "#page tr.this")
        assert [h.get_attribute("data-post") for h in highlighted] == [str(item["post_id"])]
        positions = [int(r.find_elements(By.TAG_NAME, "td")[0].text) for r in driver.find_elements(By.CSS_SELECTOR, "#page tbody tr")]
        assert positions == list(range(1, 11))
        bars = driver.find_elements(By.CSS_SELECTOR, "#chart rect.bar")
        assert sorted(b.get_attribute("data-part") for b in bars) == sorted([*HEAD_NAMES, "adjustments"])
        assert sum(float(b.get_attribute("data-value")) for b in bars) == pytest.approx(item["score"], abs=1e-4)
        stages = [r.find_elements(By.TAG_NAME, "td")[0].text for r in driver.find_elements(By.CSS_SELECTOR, "#funnel tbody tr")]
        assert "TopKSelector(light_score)" in stages and "RerankSelector" in stages
        assert len(driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")) == len(HEAVY_NAMES)
        shot = tmp_path / "debug-page.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        out = REPO / "var" / "test-output"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "debug-page.png")
        # another post of the page, by its link: the page explains it in place
        other = page["items"][6]
        driver.find_element(By.CSS_SELECTOR, f"#page tr[data-post='{other['post_id']}'] a").click()
        WebDriverWait(driver, 20).until(lambda d: loaded(d) == str(other["post_id"]))
        assert driver.find_element(By.ID, "summary-position").text == "7"
        # a bad request shows the API's message
        driver.find_element(By.ID, "request_id").clear()
        driver.find_element(By.ID, "request_id").send_keys("0" * 32)
        driver.find_element(By.ID, "explain").click()
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "error").text)
        assert "404 NOT_FOUND" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
