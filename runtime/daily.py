"""The daily cycle, `feedrank batch daily --date D` (cron-friendly: one run per day, each step's result in
the report, a non-zero exit when a step fails):

  1. decide the running shadow, if its window is over (promote or reject: models.shadow)
  2. batch features of the 30 days ending D -> Feast offline sources -> online store (jobs/batch_features.py)
  3. the training set of the window ending D from the lake (jobs/training_set.py)
  4. retrain the heavy ranker on it, published as a candidate, not promoted (models/lake_training.py)
  5. shadow-score the candidate on live HOME traffic; the next cycle (or `feedrank models shadow status`)
     promotes or rejects it

The lake itself is kept by the streaming lake job (`feedrank jobs run lake`)."""

from __future__ import annotations

import time
from typing import Any, Callable

from core.config import Config


def daily_cycle(cfg: Config, date: str, window_days: int = 7, workers: int = 1,
                say: Callable[[str], None] = print, now_ms: int | None = None) -> dict[str, Any]:
    from features.lake import training_set_dir
    from jobs.batch_features import run as batch_features
    from jobs.training_set import run as training_set
    from models import shadow
    from models.lake_training import train_from_lake
    from models.store import ModelStore

    store = ModelStore.from_config(cfg)
    report: dict[str, Any] = {"date": date, "window_days": window_days, "steps": {}}
    t0 = time.monotonic()

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        say(f"daily cycle {date}: {name} …")
        out = fn()
        report["steps"][name] = {"seconds": round(time.monotonic() - t, 1), "result": out}
        return out

    if shadow.active(cfg) is not None:
        step("shadow decision", lambda: {k: v for k, v in shadow.status(cfg, store, now_ms=now_ms).items()
                                         if k in ("decision", "reasons", "pages", "heads", "ndcg", "candidate")})
    from features.lake import compact, days

    step("compact the lake", lambda: compact(cfg, dates=days(date, window_days)))
    step("batch features", lambda: batch_features(cfg, date, workers=workers))
    meta = step("training set", lambda: training_set(cfg, date, window_days, workers=workers))
    trained = step("retrain heavy", lambda: train_from_lake(cfg, "heavy", training_set_dir(cfg, date, window_days),
                                                            store=store, promote_heavy=False))
    version = trained["heavy"]["version"]
    step("shadow start", lambda: shadow.start(cfg, store, version, now_ms=now_ms))
    report["candidate"] = version
    report["training_rows"] = meta["splits"]["train"]["rows"]
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report
