"""The `feedrank` command line: thin command modules, one per area, that parse arguments and call the
layers below. Every command is registered on :data:`feedrank.cli.common.app` when its module is
imported; the order below is the order `feedrank --help` lists them."""

from feedrank.cli import stack_commands  # noqa: F401  up, down, status, flink, config, events, feast
from feedrank.cli import sim_commands  # noqa: F401  sim
from feedrank.cli import serve_commands  # noqa: F401  serve, token, jobs
from feedrank.cli import model_commands  # noqa: F401  train, eval, models
from feedrank.cli import batch_commands  # noqa: F401  batch
from feedrank.cli import lab_commands  # noqa: F401  bench, demo
from feedrank.cli.common import app

__all__ = ["app"]
