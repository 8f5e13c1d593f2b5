"""The feature job's interpreter collects garbage less often, and says how long collections took."""

import gc

from jobs.feature_job import _GC, gc_progress, gc_tuning


def test_gc_tuning_sets_the_young_threshold_and_times_collections():
    before = gc.get_threshold()
    try:
        gc_tuning(12_345)
        gc_tuning(12_345)  # idempotent: one timing callback
        assert gc.get_threshold() == (12_345, 10, 10)
        full, seconds = gc_progress()["gc_full"], _GC["seconds"]
        gc.collect()
        assert gc_progress()["gc_full"] == full + 1  # twice if the callback had been added twice
        assert _GC["seconds"] > seconds  # unrounded: one collection of a small heap takes well under 1 ms
        gc.collect(0)
        assert gc_progress()["gc_full"] == full + 1
    finally:
        gc.set_threshold(*before)
