"""The Feast online store on Redis, written and read in Feast's own layout.

The streaming jobs write rows with :class:`OnlineStoreWriter` (byte-identical to a Feast push,
~10x cheaper per row); serving reads one user's rows per request with :class:`OnlineStoreReader`
inside its own Redis pipeline; :class:`FeatureClient` reads through the Feast SDK (tools, tests,
checks). ``online_store_test`` checks both directions against ``get_online_features``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from core.config import Config
from features.connection import redis_client


def field_hash(name: str) -> bytes:
    """The hash field of ``<view>:<feature>`` in Feast's Redis layout: murmur3 (32-bit, unsigned), little-endian."""
    import mmh3

    return struct.pack("<I", mmh3.hash(name, signed=False))


def key_prefix(join_key: str, version: int) -> bytes:
    """Feast's serialized entity key of one int64 join key is a fixed prefix + the little-endian
    value: take the prefix from Feast's serializer and check the layout on two values."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    def ser(v: int) -> bytes:
        return serialize_entity_key(EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=v)]),
                                    entity_key_serialization_version=version)

    prefix = ser(0)[:-8]
    for v in (1, 2**40 + 12345):
        if ser(v) != prefix + struct.pack("<q", v):
            raise RuntimeError(f"Feast's entity key layout changed (v{version}); update features/online_store.py")
    return prefix


class OnlineStoreWriter:
    """Writes feature rows to Feast's Redis online store in Feast's own layout, in one pipeline.

    ``FeatureStore.push`` converts a DataFrame through Arrow into protos and reads every
    key's timestamp first: ~190 us per row inside the job, which caps the feature job far
    below its 10K events/s target. This writer produces byte-identical hashes (entity key
    serialization, murmur3 field names, ValueProto values and the ``_ts:<view>`` timestamp,
    via Feast's own helpers) for the views we push, skipping the read-before-write: each
    key has a single writer (the job's keyed operator) that writes in event order.
    ``online_store_test`` reads every view back through ``get_online_features``.
    """

    def __init__(self, cfg: Config, store: Any):
        self.redis = redis_client(cfg)
        self.project = store.config.project
        self.version = store.config.entity_key_serialization_version
        self._int_bytes: dict[int, bytes] = {}  # serialized small counts, reused (most counts are small)
        self.fields: dict[str, tuple[bytes, list[tuple[str, bytes, str]]]] = {}
        for fv in store.list_feature_views():
            prefix = key_prefix(fv.entity_columns[0].name, self.version)
            self.fields[fv.name] = (prefix, [(f.name, field_hash(f"{fv.name}:{f.name}"), _value_kind(f.dtype))
                                             for f in fv.features])

    def write(self, view: str, keys: np.ndarray, columns: dict[str, Any]) -> int:
        """Write one row per key; ``columns[name][i]`` is feature ``name`` of ``keys[i]`` (a float-list
        column may be a 2-D array). One HSET per key, packed by hand and sent in one round trip: the
        feature job writes ~5K rows/s, and redis-py's per-command packing and protobuf's per-value
        objects took about half of its flush time (py-spy)."""
        from google.protobuf.timestamp_pb2 import Timestamp

        prefix, fields = self.fields[view]
        ts = Timestamp()
        ts.GetCurrentTime()
        ts_field, ts_bytes = f"_ts:{view}".encode(), ts.SerializeToString()
        project = self.project.encode()
        cols = [(fk.encode() if isinstance(fk, str) else fk, encode_values(kind, columns[n], self._int_bytes))
                for n, fk, kind in fields if n in columns]
        nargs = b"*%d\r\n" % (4 + 2 * len(cols))
        head = [_bulk(b"HSET")]
        ts_args = _bulk(ts_field) + _bulk(ts_bytes)
        field_args = [_bulk(fk) for fk, _ in cols]
        values = [v for _, v in cols]
        out: list[bytes] = []
        for i, k in enumerate(np.asarray(keys, dtype="<i8").tobytes()[j:j + 8] for j in range(0, 8 * len(keys), 8)):
            out.append(nargs)
            out.extend(head)
            out.append(_bulk(prefix + k + project))
            out.append(ts_args)
            for fa, vals in zip(field_args, values):
                out.append(fa)
                out.append(_bulk(vals[i]))
        conn = self.redis.connection_pool.get_connection()
        try:
            conn.send_packed_command([b"".join(out)])
            errors = [r for r in (conn.read_response() for _ in range(len(keys))) if isinstance(r, Exception)]
        except BaseException:
            conn.disconnect()  # a half-read reply stream must not be reused
            raise
        finally:
            self.redis.connection_pool.release(conn)
        if errors:
            raise RuntimeError(f"online store write of {view} failed for {len(errors)} rows: {errors[0]}")
        return len(keys)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _varint(v: int) -> bytes:
    v &= 0xFFFFFFFFFFFFFFFF  # negative int64: ten bytes of two's complement, as protobuf writes them
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def encode_values(kind: str, col: Any, int_cache: dict[int, bytes] | None = None) -> list[bytes]:
    """Feast ValueProto bytes of every row of one column, identical to ``Value(...).SerializeToString()``
    (checked by online_store_test): int64_val (field 4, varint), float_val (6, fixed32), bool_val (7),
    float_list_val (16: a FloatList with its packed field 1); int64 lists (batch views only) through the proto."""
    if kind == "il":
        from feast.protos.feast.types.Value_pb2 import Int64List, Value

        return [Value(int64_list_val=Int64List(val=[int(x) for x in r])).SerializeToString() for r in col]
    if kind == "fl":
        try:
            a = np.asarray(col, dtype="<f4")
        except ValueError:  # ragged rows
            a = None
        if a is None or a.ndim != 2:
            return [encode_values("fl", np.asarray([r], dtype="<f4").reshape(1, -1))[0] for r in col]
        n, d = a.shape
        if d == 0:
            return [b"\x82\x01\x00"] * n
        inner = b"\x0a" + _varint(4 * d)
        head = b"\x82\x01" + _varint(len(inner) + 4 * d) + inner
        raw = a.tobytes()
        w = 4 * d
        return [head + raw[i:i + w] for i in range(0, n * w, w)]
    if kind == "f":
        raw = np.asarray(col, dtype="<f4").tobytes()
        return [b"\x35" + raw[i:i + 4] for i in range(0, len(raw), 4)]
    if kind == "b":
        return [b"\x38\x01" if v else b"\x38\x00" for v in (col.tolist() if isinstance(col, np.ndarray) else col)]
    cache = int_cache if int_cache is not None else {}
    out = []
    for v in (col.tolist() if isinstance(col, np.ndarray) else col):
        b = cache.get(v)
        if b is None:
            b = b"\x20" + _varint(int(v))
            if len(cache) < 100_000:
                cache[v] = b
        out.append(b)
    return out


def _value_kind(dtype: Any) -> str:
    from feast.types import Array, Bool, Float32, Int64

    if dtype == Int64:
        return "i"
    if dtype == Float32:
        return "f"
    if dtype == Bool:
        return "b"
    if dtype == Array(Float32):
        return "fl"
    if dtype == Array(Int64):
        return "il"
    raise ValueError(f"unsupported feature type {dtype}")


class OnlineStoreReader:
    """Reads one entity's feature views straight from Feast's Redis layout (serving's per-request path).

    ``get_online_features`` for a single user costs milliseconds of Python (request
    building, proto conversion, registry lookups); this reads the same hash with one
    HMGET per view inside the caller's pipeline and decodes the ValueProtos, ~50 us.
    ``online_store_test`` checks it against ``get_online_features``. A missing row reads as
    None. Like Feast's Redis online read, it does not apply the view TTL (rows are only as
    old as their writer's last push; Redis key expiry is the store's business).
    """

    def __init__(self, cfg: Config, store: Any):
        version = store.config.entity_key_serialization_version
        self.project = store.config.project.encode()
        self.views: dict[str, tuple[bytes, list[tuple[str, bytes]]]] = {}
        for fv in store.list_feature_views():
            prefix = key_prefix(fv.entity_columns[0].name, version)
            self.views[fv.name] = (prefix, [(f.name, field_hash(f"{fv.name}:{f.name}")) for f in fv.features])

    def key(self, view: str, entity: int) -> bytes:
        import struct

        return self.views[view][0] + struct.pack("<q", int(entity)) + self.project

    def queue(self, pipe: Any, view: str, entity: int) -> None:
        """Add the read of ``view`` for ``entity`` to ``pipe`` (decode its result with :meth:`decode`)."""
        _, fields = self.views[view]
        pipe.hmget(self.key(view, entity), [f"_ts:{view}".encode()] + [fk for _, fk in fields])

    def decode(self, view: str, raw: list[bytes | None]) -> dict[str, Any] | None:
        from feast.protos.feast.types.Value_pb2 import Value
        from google.protobuf.timestamp_pb2 import Timestamp

        _, fields = self.views[view]
        if not raw or raw[0] is None:
            return None
        ts = Timestamp()
        ts.ParseFromString(raw[0])
        out: dict[str, Any] = {"_ts": ts.seconds + ts.nanos / 1e9}
        for (name, _), b in zip(fields, raw[1:]):
            if b is None:
                out[name] = None
                continue
            v = Value()
            v.ParseFromString(b)
            kind = v.WhichOneof("val")
            val = getattr(v, kind) if kind else None
            out[name] = list(val.val) if kind and kind.endswith("_list_val") else val
        return out

    def read(self, redis: Any, view: str, entities: list[int]) -> list[dict[str, Any] | None]:
        with redis.pipeline(transaction=False) as pipe:
            for e in entities:
                self.queue(pipe, view, e)
            raw = pipe.execute()
        return [self.decode(view, r) for r in raw]


class FeatureClient:
    """Serving's per-request reads: one user's features through Feast."""

    USER_FEATURES = ["user_topic:topic_clicks", "user_topic:topic_negative", "user_topic:ctype_clicks",
                     "user_topic:clicks", "user_topic:negatives", "user_topic:clicks_1h",
                     "user_topic:last_engagement_ms", "user_embedding:embedding"]

    def __init__(self, cfg: Config):
        from features.feast_repo import feature_store

        self.store = feature_store(cfg)

    def user(self, user_id: int) -> dict[str, Any]:
        out = self.store.get_online_features(self.USER_FEATURES, entity_rows=[{"user_id": int(user_id)}]).to_dict()
        return {k: v[0] for k, v in out.items()}

    def posts(self, post_ids: list[int], features: list[str]) -> dict[str, list[Any]]:
        """Feast read for a few posts (bootstrap and checks; never per candidate)."""
        return self.store.get_online_features(features, entity_rows=[{"post_id": int(p)} for p in post_ids]).to_dict()
