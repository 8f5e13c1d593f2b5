"""The real-time feature arithmetic, by hand."""

from __future__ import annotations

import pytest

from features import realtime as rt
from core.events import Engagement, Exposure, PostPublished

T = 1_767_571_200_000
LONG = 30_000  # heads.long_dwell_ms


def _c(ev) -> tuple:
    out = rt.compact(ev.to_json())
    assert not isinstance(out, str), out
    return out


def test_compact_rejects_with_a_reason():
    assert "dwell_ms is required" in rt.compact('{"v":1,"type":"engagement","event_id":"a","ts":%d,"user_id":1,'
                                               '"post_id":2,"action":"dwell"}' % T)
    assert rt.compact("{nope").startswith("not JSON")


def test_post_counts_windows_and_rates():
    s = rt.new_post_state()
    pub = PostPublished(event_id="p", ts=T, post_id=7, author_id=3, topic=5, content_type="image")
    assert rt.post_update(s, _c(pub), 30_000) and s[rt.P_META] == (3, 5, 1, T)
    for i in range(4):
        rt.post_update(s, _c(Exposure(event_id=f"x{i}", ts=T + i, request_id="r", user_id=i, post_id=7, position=1,
                                      feed_type="home", source="in_network")), 30_000)
    clicks = [T + 60_000, T + 10 * 60_000, T + 58 * 60_000]
    for i, ts in enumerate(clicks):
        rt.post_update(s, _c(Engagement(event_id=f"c{i}", ts=ts, user_id=i, post_id=7, action="click")), 30_000)
    assert not rt.post_update(s, _c(Engagement(event_id="v", ts=T, user_id=1, post_id=7, action="view")), 30_000)
    rt.post_update(s, _c(Engagement(event_id="d", ts=T, user_id=1, post_id=7, action="dwell", dwell_ms=31_000)), 30_000)
    ints, floats = rt.post_row(s)
    assert ints == [4, 3, 0, 0, 0, 0, 1, 1, 3]  # impressions .. long_dwells, clicks_5m, clicks_1h
    assert floats[0] == pytest.approx(5 / 24)
    ints, _ = rt.post_row(s, now_ms=T + 70 * 60_000)  # an hour later the early clicks left the window
    assert ints[-2:] == [0, 1]


def test_batched_post_rows_equal_the_per_post_ones():
    import numpy as np

    rng = np.random.default_rng(1)
    rows = []
    for p in range(6):
        s = rt.new_post_state()
        for i in range(int(rng.integers(0, 40))):
            a = str(rng.choice(["click", "like", "share", "hide", "view"]))
            rt.post_update(s, (rt.ENGAGEMENT, f"{p}-{i}", T + i * 97_000, 1, p, 3, rt.A[a], 0, -1, -1, "", 1), 30_000)
        rows.append((s, None if p % 2 else T + 50 * 60_000))
    ints, floats = rt.post_rows(rows)
    for i, (s, now) in enumerate(rows):
        iv, fv = rt.post_row(s, now)
        assert ints[i].tolist() == iv
        assert floats[i].tolist() == np.asarray(fv, dtype=np.float32).tolist()


def test_user_topic_shares_and_negatives():
    s = rt.new_user_state(follows=[9])
    e = (rt.ENGAGEMENT, "a", T, 1, 7, 3, rt.A["click"], 0, 5, 2, "", 1)
    assert rt.user_update(s, e, LONG) == (True, True, False)
    rt.user_update(s, (rt.ENGAGEMENT, "b", T + 1, 1, 8, 3, rt.A["hide"], 0, 6, 0, "", 1), LONG)
    rt.user_update(s, (rt.FOLLOW, "f", T + 2, 1, -1, 4, -1, 0, -1, -1, "", 0), LONG)
    row = rt.user_row(s)
    assert row["topic_clicks"][5] == 1.0 and row["topic_negative"][6] == 1.0 and row["clicks"] == 1
    assert row["negatives"] == 1 and row["ctype_clicks"] == [0.0, 0.0, 1.0] and s[rt.U_FOLLOWS] == [9, 4]
    dense = rt.user_dense(s)
    assert dense[5] == 1.0 and dense[-2] == pytest.approx(0.5)  # neg_total = 1 / (1 + 1)


def test_likes_shares_and_long_dwells_move_topic_preferences_but_only_clicks_count_as_clicks():
    s = rt.new_user_state()
    ev = lambda i, a, topic, dwell=0: (rt.ENGAGEMENT, f"e{i}", T + i, 1, 100 + i, 3, rt.A[a], dwell, topic, 1, "", 1)  # noqa: E731
    assert rt.user_update(s, ev(0, "like", 4), LONG) == (True, True, True)    # a like is also a session fact
    assert rt.user_update(s, ev(1, "share", 4), LONG) == (True, True, False)
    assert rt.user_update(s, ev(2, "dwell", 7, dwell=LONG), LONG) == (True, True, False)
    assert rt.user_update(s, ev(3, "dwell", 9, dwell=LONG - 1), LONG) == (True, False, False)  # short: no preference
    row = rt.user_row(s)
    assert row["topic_clicks"][4] == pytest.approx(2 / 3) and row["topic_clicks"][7] == pytest.approx(1 / 3)
    assert row["topic_clicks"][9] == 0.0 and row["ctype_clicks"][1] == 1.0
    assert row["clicks"] == 0 and s[rt.U_LIKED] == [100]


def test_views_keep_the_session_and_a_pause_starts_a_new_one():
    s = rt.new_user_state()
    view = lambda i, ts: (rt.ENGAGEMENT, f"v{i}", ts, 1, i, 3, rt.A["view"], 0, -1, -1, "", i)  # noqa: E731
    for i in range(12):
        assert rt.user_update(s, view(i, T + i * 1500), LONG) == (False, False, True)
    row = rt.session_rows([s])
    assert row["viewed_posts"] == [list(range(2, 12))] and row["session_depth"].tolist() == [12]
    assert row["session_start_ms"].tolist() == [T] and row["last_view_ms"].tolist() == [T + 11 * 1500]
    assert rt.user_update(s, view(99, T + 5000), LONG) == (False, False, False)  # late: the session stays as pushed
    later = T + 11 * 1500 + rt.SESSION_GAP_MS + 1
    rt.user_update(s, view(50, later), LONG)
    row = rt.session_rows([s])
    assert row["viewed_posts"] == [[50]] and row["session_depth"].tolist() == [1] and row["session_start_ms"].tolist() == [later]
    for i in range(7):  # the last 5 likes, across sessions
        rt.user_update(s, (rt.ENGAGEMENT, f"l{i}", later + i, 1, 200 + i, 3, rt.A["like"], 0, 2, 0, "", 1), LONG)
    assert rt.session_rows([s])["liked_posts"] == [[202, 203, 204, 205, 206]]


def test_a_state_checkpointed_before_the_session_fields_is_upgraded():
    s = rt.new_user_state()[:8]
    rt.user_update(s, (rt.ENGAGEMENT, "v", T, 1, 5, 3, rt.A["view"], 0, -1, -1, "", 1), LONG)
    assert s[rt.U_VIEWED] == [5] and s[rt.U_DEPTH] == 1


def test_batched_user_rows_and_dense_equal_the_per_user_ones():
    import numpy as np

    rng = np.random.default_rng(0)
    states = []
    for u in range(5):
        s = rt.new_user_state(follows=[u])
        for i in range(int(rng.integers(0, 30))):
            a = rt.A[str(rng.choice(["click", "like", "hide", "click"]))]
            rt.user_update(s, (rt.ENGAGEMENT, f"{u}-{i}", T + i * 60_000, u, i, 3, a, 0, int(rng.integers(-1, 20)),
                               int(rng.integers(-1, 3)), "", 1), LONG)
        states.append(s)
    cols = rt.user_rows(states)
    for i, s in enumerate(states):
        row = rt.user_row(s)
        for k, v in row.items():
            assert np.asarray(cols[k][i]).tolist() == v, k
        np.testing.assert_array_equal(rt.user_dense_many(states)[i], rt.user_dense(s))


def test_topic_trend_against_long_run():
    s = rt.new_topic_state()
    for h in range(10):  # one click an hour for 10 hours, then a burst
        rt.topic_update(s, T + h * rt.HOUR_MS)
    for i in range(20):
        rt.topic_update(s, T + 10 * rt.HOUR_MS + i * 1000)
    c5, c1h, longrun, trend = rt.topic_row(s)
    assert (c5, c1h) == (20.0, 20.0) and longrun == pytest.approx(30 / (10 + 19 / 3600))  # 30 clicks over 10 h 19 s
    assert trend > 1.0


def test_compact_many_equals_compact_one_by_one_with_bad_events_among_good():
    from sim.eventgen import synthetic_events

    lines = [e.to_json() for e in synthetic_events(50, seed=5)]
    assert rt.compact_many(lines) == [rt.compact(x) for x in lines]
    bad = lines[:10] + ['{"type": "engagement", "user_id": 1}', "not json", '{"a": 1}, {"b": 2}'] + lines[10:20]
    got = rt.compact_many(bad)
    assert got == [rt.compact(x) for x in bad]
    assert all(isinstance(g, str) for g in got[10:13]) and not any(isinstance(g, str) for g in got[:10] + got[13:])
