"""Each replica's metrics are its own, also after `import feast` (which switches prometheus_client to
multi-process files unless feedrank fixed the value class first)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import core, feast
from serving.metrics import Metrics
a, b = Metrics(), Metrics()
a.rpcs.labels("GetFeed", "OK").inc()
b.rpcs.labels("GetFeed", "OK").inc(2)
print(a.registry.get_sample_value("feedrank_rpcs_total", {"rpc": "GetFeed", "code": "OK"}))
a.set_models({"heavy": "v1"})
a.set_models({"heavy": "v2"})
print(sorted(s.labels["version"] for m in a.registry.collect() if m.name == "feedrank_model_version_info"
             for s in m.samples))
"""


def test_metrics_stay_per_replica_after_feast_is_imported():
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", CHECK], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["1.0", "['v2']"], out.stdout  # not 3.0; the replaced version is gone
