"""Generated gRPC code for ``serving/proto/feed.proto``, built when missing or stale.

The generated modules are build output (git-ignored): they are produced by grpc_tools'
protoc the first time anything imports this module after a checkout or a change to the
.proto, so the repository holds only the .proto. ``make proto`` does the same eagerly.
"""

from __future__ import annotations

import fcntl
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path(__file__).resolve().parent / "proto" / "feed.proto"
OUT = PROTO.parent


def generate(force: bool = False) -> None:
    """Run protoc unless the generated files are newer than the .proto (safe across processes)."""
    targets = [OUT / "feed_pb2.py", OUT / "feed_pb2_grpc.py"]
    if not force and all(t.exists() and t.stat().st_mtime >= PROTO.stat().st_mtime for t in targets):
        return
    from grpc_tools import protoc

    with open(OUT / ".protoc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers / replicas must not write half files
        if not force and all(t.exists() and t.stat().st_mtime >= PROTO.stat().st_mtime for t in targets):
            return
        include = Path(protoc.__file__).resolve().parent / "_proto"
        rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}",
                          f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", str(PROTO.relative_to(ROOT))])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")


generate()
pb = importlib.import_module("serving.proto.feed_pb2")
rpc = importlib.import_module("serving.proto.feed_pb2_grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeedService"].full_name
