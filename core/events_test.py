from __future__ import annotations

import json

import pytest

from core.events import (
    Engagement, Exposure, Followed, InvalidEvent, PostPublished, Unfollowed, parse_event,
)

TS = 1_767_571_200_000


def _examples():
    return [
        PostPublished(post_id=1, author_id=2, topic=3, content_type="video", text="ka lo", ts=TS),
        PostPublished(post_id=5, author_id=2, topic=3, content_type="text", is_original=False, original_post_id=1, ts=TS),
        Followed(user_id=7, author_id=2, ts=TS),
        Unfollowed(user_id=7, author_id=2, ts=TS),
        Exposure(request_id="r1", user_id=7, post_id=1, author_id=2, position=1, feed_type="home",
                 source="out_of_network", model_version="heavy-3", experiments={"exp1": "b"}, snapshot_id="s1", ts=TS),
        Engagement(user_id=7, post_id=1, action="dwell", dwell_ms=31_000, position=1, ts=TS),
        Engagement(user_id=7, post_id=1, action="not_interested", ts=TS),
    ]


@pytest.mark.parametrize("ev", _examples(), ids=lambda e: e.type)
def test_round_trip_is_byte_identical(ev):
    line = ev.to_json()
    again = parse_event(line)
    assert again == ev
    assert again.to_json() == line
    assert json.loads(line)["v"] == 1 and json.loads(line)["event_id"]


def test_partition_key_is_user_or_author():
    assert _examples()[0].partition_key == 2
    assert _examples()[4].partition_key == 7


BASE = {"type": "engagement", "user_id": 1, "post_id": 2, "action": "click", "ts": TS}


@pytest.mark.parametrize(
    "data, reason",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ({**BASE, "type": "purchase"}, "type: must be one of"),
        ({**BASE, "v": 2}, "unsupported schema version"),
        ({k: v for k, v in BASE.items() if k != "post_id"}, "post_id: Field required"),
        ({**BASE, "action": "dwell"}, "dwell_ms is required"),
        ({**BASE, "dwell_ms": 10}, "dwell_ms is only allowed"),
        ({**BASE, "action": "teleport"}, "action: Input should be"),
        ({**BASE, "ts": TS // 1000}, "ts: Input should be greater than or equal"),
        ({**BASE, "user_id": -1}, "user_id: Input should be greater than or equal to 0"),
        ({**BASE, "color": "red"}, "color: Extra inputs are not permitted"),
        ({**BASE, "position": 0}, "position"),
        ({"type": "followed", "user_id": 3, "author_id": 3, "ts": TS}, "cannot follow themself"),
        ({"type": "post_published", "post_id": 1, "author_id": 2, "topic": 1, "content_type": "text",
          "is_original": False, "ts": TS}, "needs original_post_id"),
        ({"type": "post_published", "post_id": 1, "author_id": 2, "topic": 1, "content_type": "hologram", "ts": TS},
         "content_type"),
        ({"type": "exposure", "request_id": "r", "user_id": 1, "post_id": 2, "position": 3, "feed_type": "home",
          "source": "nowhere", "ts": TS}, "source"),
    ],
)
def test_malformed_events_are_rejected_with_a_reason(data, reason):
    with pytest.raises(InvalidEvent) as e:
        parse_event(json.dumps(data) if isinstance(data, dict) else data)
    assert reason in e.value.reason, e.value.reason


def test_reason_names_the_event_type():
    with pytest.raises(InvalidEvent) as e:
        parse_event({**BASE, "action": "dwell"})
    assert e.value.reason.startswith("engagement: ")
