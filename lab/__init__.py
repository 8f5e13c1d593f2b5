"""The lab: the demo, benchmarks and experiments on the simulated world (uses every layer below)."""
