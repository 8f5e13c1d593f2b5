"""`python -m feedrank.cli`: the same as the `feedrank` console script."""

from feedrank.cli import app

app()
