"""The simulated clients wired to the FeedService (own server: the simulator's world assigns post ids,
so no other test may have published into this server)."""

from __future__ import annotations

import pytest

from features.eventlog import read_all
from core.events import parse_event

pytestmark = pytest.mark.slow


def test_simulated_clients_drive_the_service_through_the_cli(serving, served_world):
    """`feedrank sim clients --target grpc`: real users scrolling, engaging, following, creators publishing."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update(served_world.env, FEEDRANK_REDIS=serving.cfg.redis.uri, FEEDRANK_CLIENTS_SESSION_GAP_S="4",
               FEEDRANK_CLIENTS_PUBLISH_PER_MIN="60")
    before = len(read_all(serving.state.events.reader(), idle_s=0.3))
    exe = Path(sys.executable).parent / "feedrank"
    r = subprocess.run([str(exe), "sim", "clients", "--world", str(served_world.world_dir), "--users", "40",
                        "--duration", "12", "--address", serving.address, "--seed", "3"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == 0 and out["sessions"] >= 10 and out["grpc"]["get_feed_calls"] >= 10, out
    assert out["published"] >= 3 and out["impressions"] > 0
    serving.service.feeds.effects.drain()
    new = [parse_event(x) for x in read_all(serving.state.events.reader(), idle_s=0.5)][before:]
    kinds = {e.type for e in new}
    assert {"exposure", "engagement", "post_published"} <= kinds, kinds
