"""Feast definitions for feedrank (what `feast apply` reads in this directory).

The objects are built once, in :func:`features.feast_repo.definitions`, so the CLI, the
streaming jobs and the serving tier register exactly the same entities, views and push
sources. Offline sources are Parquet files under ``<data_dir>/feast``, plus one ``lake_<table>`` source per
table of the served-data lake (``lake.uri``).
"""

from core.config import get_config
from features.feast_repo import definitions
from features.lake import lake_dir

globals().update(definitions(get_config().data_dir, lake_dir(get_config())))
