"""`feedrank sim seed-lake`: a simulated world's logged history written into the lake in the lake job's
format, so the batch tier and `train --from-lake` can run before FeedService has served anything.

Each logged impression becomes an exposure; each logged request one ``features_served`` row holding its
impressions' heavy-feature rows computed point in time (:func:`models.train.ranking_rows`, with the store's
current two-tower, as serving would have computed them); the engagements, posts and follows are copied.
Reposts carry no original post id (the simulator does not record it). Rows go through
:func:`features.lake.write_rows`: one new file per table and hour partition, never touching the job's files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import Config
from core.events import CONTENT_TYPES
from core.schema import HEAVY_FEATURES, schema_hash
from core.units import DAY_MS


def seed_lake(cfg: Config, data_dir: Path, store: Any = None, days: float | None = None, chunk: int = 100_000,
              progress: Callable[[str, float], None] = lambda s, f: None) -> dict[str, Any]:
    """Write the last ``days`` of the world's history (all of it if None); returns the rows per table."""
    from features import lake
    from models.sim_data import SimData
    from models.store import ModelStore
    from models.train import load_two_tower, ranking_rows

    t0 = time.monotonic()
    store = store or ModelStore.from_config(cfg)
    progress("loading the world", 0.0)
    data = SimData.load(data_dir)
    model, emb = load_two_tower(store, data)
    w, imp, eng = data.world, data.impressions, data.engagements
    lo = int(w.end_ms - days * DAY_MS) if days else int(w.start_ms)
    rows = np.flatnonzero(imp["ts"].to_numpy() >= lo)
    rows = rows[np.lexsort((imp["position"].to_numpy()[rows], imp["request_id"].to_numpy()[rows]))]
    h = schema_hash(HEAVY_FEATURES)
    counts = {"exposures": 0, "features_served": 0}
    req_all = imp["request_id"].to_numpy()
    # chunks end at a request boundary, so each request's rows are one features_served row
    bounds = [0]
    while bounds[-1] < rows.size:
        end = min(rows.size, bounds[-1] + chunk)
        while end < rows.size and req_all[rows[end]] == req_all[rows[end - 1]]:
            end += 1
        bounds.append(end)
    for a, b in zip(bounds, bounds[1:]):
        part = rows[a:b]
        f = ranking_rows(data, model, emb, part)
        sub = imp.iloc[part]
        req, pos = sub["request_id"].to_numpy(), sub["position"].to_numpy()
        first = np.r_[True, req[1:] != req[:-1]]
        starts = np.flatnonzero(first)
        ends = np.r_[starts[1:], req.size]
        sid = np.empty(req.size, dtype=object)
        served = []
        for s, e in zip(starts, ends):
            snap = f"{req[s]}:{int(pos[s])}"
            for c in range(s, e, 1000):  # a features_served row holds at most 1,000 posts
                cid = snap if c == s else f"{snap}+{c - s}"
                sid[c:min(e, c + 1000)] = cid
                served.append((f"seed-fs-{cid}", int(sub["ts"].iat[c]), str(req[s]), cid, int(sub["user_id"].iat[s]),
                               sub["post_id"].to_numpy()[c:min(e, c + 1000)].astype(int).tolist(), h,
                               int(f["x"].shape[1]), np.ascontiguousarray(f["x"][c:min(e, c + 1000)], dtype="<f4").tobytes()))
        exposures = [(f"seed-x-{r}-{p}", int(t), str(r), int(u), int(po), int(au), int(p), str(ft), str(so), str(mv), "{}", s_)
                     for r, t, u, po, au, p, ft, so, mv, s_ in zip(
                         req, sub["ts"], sub["user_id"], sub["post_id"], sub["author_id"], pos, sub["feed_type"],
                         sub["source"], sub["model_version"], sid)]
        lake.write_rows(cfg, "exposures", exposures, writer="sim")
        lake.write_rows(cfg, "features_served", served, writer="sim")
        counts["exposures"] += len(exposures)
        counts["features_served"] += len(served)
        progress("exposures and served rows", b / max(rows.size, 1))
    e = eng[eng["ts"].to_numpy() >= lo]
    dwell = e["dwell_ms"].to_numpy(dtype=np.float64, na_value=np.nan)
    lake.write_rows(cfg, "engagements", [
        (str(i), int(t), int(u), int(p), str(a), None if np.isnan(d) else int(d), int(au), int(po), str(r))
        for i, t, u, p, a, d, au, po, r in zip(e["event_id"], e["ts"], e["user_id"], e["post_id"], e["action"], dwell,
                                               e["author_id"], e["position"], e["request_id"])], writer="sim")
    counts["engagements"] = len(e)
    text = data.posts_text
    lake.write_rows(cfg, "posts", [
        (f"seed-p-{p}", int(w.post_ts[p]), p, int(w.post_author[p]), int(w.post_topic[p]), CONTENT_TYPES[int(w.post_ctype[p])],
         bool(w.post_original[p]), None, bool(w.post_flagged[p]), text[p]) for p in range(w.post_ts.size)], writer="sim")
    counts["posts"] = int(w.post_ts.size)
    lake.write_rows(cfg, "follows", [(f"seed-f-{s}-{d}", int(w.start_ms), int(s), int(d), True)
                                     for s, d in zip(w.follow_src, w.follow_dst)], writer="sim")
    counts["follows"] = int(w.follow_src.size)
    return {"data_dir": str(data_dir), "since_ms": lo, "until_ms": int(w.end_ms), "rows": counts,
            "seconds": round(time.monotonic() - t0, 1), "lake": cfg.lake.uri}
