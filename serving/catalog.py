"""What a serving replica holds in memory: every post's static attributes and embedding,
and the follow graph, each kept current by a Redis change stream.

Feast reads cost 60-300 ms per 500 entities, so nothing about a *candidate* is read
per request: posts (author, topic, type, original, policy flag, publish time), their
two-tower embeddings and the follow graph live here as numpy arrays, bootstrapped from
the batch exports (``posts.parquet``, ``follows.parquet``: the post store's and the
social graph's snapshots) and then following ``feedrank:changes:posts`` and
``feedrank:changes:follows``, which every replica applies (idempotently) within
milliseconds. The replica that accepted a write applies it at once as well.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from core.events import CONTENT_TYPES
from features.change_streams import StreamFollower


log = logging.getLogger("feedrank.serving")

#: a post change more than this past the largest known id is refused: arrays are indexed by post id
MAX_ID_STEP = 1_000_000
POST_CHANGES = "feedrank:changes:posts"
FOLLOW_CHANGES = "feedrank:changes:follows"
# every change since the bootstrap export, by key (the streams keep only the last change_stream_maxlen):
# a replica that starts later loads these first, so it knows every post and edge however long ago it changed
POSTS_SINCE_EXPORT = "feedrank:posts:since-export"      # post id -> its change (JSON)
FOLLOWS_SINCE_EXPORT = "feedrank:follows:since-export"  # "user:author" -> 1 (follows) / 0 (does not)
CTYPES = tuple(CONTENT_TYPES)  # a post's content type is its index here
EMB_DIM = 128


class PostCatalog:
    """Columnar post attributes indexed by post id, plus each author's posts in time order."""

    def __init__(self, capacity: int = 1 << 16, dim: int = EMB_DIM):
        self.n = 0  # one past the largest post id known
        self.count = 0  # posts known (ids may have gaps)
        self.max_author = -1
        self.author = np.full(capacity, -1, dtype=np.int64)
        self.topic = np.zeros(capacity, dtype=np.int64)
        self.ctype = np.zeros(capacity, dtype=np.int64)
        self.original = np.ones(capacity, dtype=bool)
        self.flagged = np.zeros(capacity, dtype=bool)
        self.published_ms = np.zeros(capacity, dtype=np.int64)
        # float16: the index's post_emb.npy holds them at that precision already (exact here), and on 1M posts
        # it is 256 MB per worker less than float32; rows are widened where used (:meth:`embeddings`)
        self.emb = np.zeros((capacity, dim), dtype=np.float16)
        self.has_emb = np.zeros(capacity, dtype=bool)
        self.by_author: dict[int, list[int]] = defaultdict(list)  # post ids, publish order
        self.lock = threading.Lock()

    def _grow(self, n: int) -> None:
        cap = self.author.size
        if n <= cap:
            return
        new = max(n, cap * 2)
        pad = new - cap
        self.author = np.concatenate([self.author, np.full(pad, -1, dtype=np.int64)])
        for name in ("topic", "ctype", "published_ms"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(pad, dtype=np.int64)]))
        self.original = np.concatenate([self.original, np.ones(pad, dtype=bool)])
        self.flagged = np.concatenate([self.flagged, np.zeros(pad, dtype=bool)])
        self.has_emb = np.concatenate([self.has_emb, np.zeros(pad, dtype=bool)])
        self.emb = np.vstack([self.emb, np.zeros((pad, self.emb.shape[1]), dtype=self.emb.dtype)])

    def load(self, ids: np.ndarray, author: np.ndarray, topic: np.ndarray, ctype: np.ndarray, original: np.ndarray,
             flagged: np.ndarray, published_ms: np.ndarray) -> None:
        """Bulk insert (bootstrap); ``ctype`` as indices into CTYPES."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        with self.lock:
            self._grow(int(ids.max()) + 1)
            self.count += int(np.unique(ids[self.author[ids] < 0]).size)
            self.max_author = max(self.max_author, int(np.max(author)))
            self.author[ids], self.topic[ids], self.ctype[ids] = author, topic, ctype
            self.original[ids], self.flagged[ids], self.published_ms[ids] = original, flagged, published_ms
            self.n = max(self.n, int(ids.max()) + 1)
            order = np.lexsort((published_ms, author))
            a_sorted, p_sorted = np.asarray(author)[order], ids[order]
            cut = np.flatnonzero(np.diff(a_sorted)) + 1
            for a, pids in zip(a_sorted[np.concatenate([[0], cut])].tolist(), np.split(p_sorted, cut)):
                self.by_author[a].extend(pids.tolist())

    def add(self, post_id: int, author: int, topic: int, ctype: int, original: bool, flagged: bool,
            published_ms: int) -> bool:
        """One new post; False when it was already known (a replayed change)."""
        with self.lock:
            if post_id < self.n and self.author[post_id] >= 0:
                return False
            self._grow(post_id + 1)
            self.author[post_id], self.topic[post_id], self.ctype[post_id] = author, topic, ctype
            self.original[post_id], self.flagged[post_id], self.published_ms[post_id] = original, flagged, published_ms
            self.n = max(self.n, post_id + 1)
            self.count += 1
            self.max_author = max(self.max_author, author)
            self.by_author[author].append(post_id)
            return True

    def set_embeddings(self, ids: np.ndarray, emb: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        with self.lock:
            self._grow(int(ids.max()) + 1)
            self.emb[ids] = emb
            self.has_emb[ids] = True

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """The posts' embeddings as float32 (zeros for a post without one yet)."""
        return self.emb[ids].astype(np.float32)

    def known(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < self.n)
        out = np.zeros(ids.shape, dtype=bool)
        out[ok] = self.author[ids[ok]] >= 0
        return out

    def recent_by_authors(self, authors: list[int], since_ms: int, now_ms: int, per_author: int = 50) -> np.ndarray:
        """Posts of ``authors`` published in (since_ms, now_ms], newest first per author."""
        out: list[int] = []
        pub = self.published_ms
        for a in authors:
            pids = self.by_author.get(a)
            if not pids:
                continue
            taken = 0
            for pid in reversed(pids):
                ts = pub[pid]
                if ts > now_ms:
                    continue
                if ts <= since_ms or taken >= per_author:
                    break
                out.append(pid)
                taken += 1
        return np.array(out, dtype=np.int64)

    @property
    def max_id(self) -> int:
        return self.n - 1


class FollowGraph:
    """Who follows whom: a CSR snapshot plus the edges added / removed since."""

    def __init__(self) -> None:
        self.src_off = np.zeros(1, dtype=np.int64)
        self.dst = np.zeros(0, dtype=np.int64)  # following lists (by follower)
        self.in_off = np.zeros(1, dtype=np.int64)
        self.inv = np.zeros(0, dtype=np.int64)  # follower lists (by author)
        self.added: dict[int, set[int]] = defaultdict(set)
        self.removed: dict[int, set[int]] = defaultdict(set)
        self.added_in: dict[int, set[int]] = defaultdict(set)
        self.removed_in: dict[int, set[int]] = defaultdict(set)
        self.in_delta = np.zeros(0, dtype=np.int64)  # follower-count change per author since the snapshot
        self.lock = threading.Lock()

    def load(self, src: np.ndarray, dst: np.ndarray) -> None:
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        n = int(max(src.max(initial=-1), dst.max(initial=-1))) + 1
        o = np.lexsort((dst, src))
        self.dst = dst[o]
        self.src_off = np.searchsorted(src[o], np.arange(n + 1))
        o = np.lexsort((src, dst))
        self.inv = src[o]
        self.in_off = np.searchsorted(dst[o], np.arange(n + 1))

    def _base(self, off: np.ndarray, arr: np.ndarray, k: int) -> np.ndarray:
        if 0 <= k < off.size - 1:
            return arr[off[k]: off[k + 1]]
        return arr[:0]

    def following(self, user: int) -> list[int]:
        base = self._base(self.src_off, self.dst, user).tolist()
        add, rm = self.added.get(user), self.removed.get(user)
        if not add and not rm:
            return base
        s = (set(base) | (add or set())) - (rm or set())
        return sorted(s)

    def followers(self, author: int) -> list[int]:
        base = self._base(self.in_off, self.inv, author).tolist()
        add, rm = self.added_in.get(author), self.removed_in.get(author)
        if not add and not rm:
            return base
        return sorted((set(base) | (add or set())) - (rm or set()))

    def follower_count(self, author: int) -> int:
        base = self._base(self.in_off, self.inv, author)
        return int(base.size) + len(self.added_in.get(author, ())) - len(self.removed_in.get(author, ()))

    def follower_counts(self, authors: np.ndarray) -> np.ndarray:
        authors = np.asarray(authors, dtype=np.int64)
        ok = (authors >= 0) & (authors < self.in_off.size - 1)
        out = np.zeros(authors.shape, dtype=np.int64)
        out[ok] = self.in_off[authors[ok] + 1] - self.in_off[authors[ok]]
        d = self.in_delta
        if d.size:
            okd = (authors >= 0) & (authors < d.size)
            out[okd] += d[authors[okd]]
        return out

    @property
    def n_nodes(self) -> int:
        """One past the largest user id of the snapshot."""
        return max(self.src_off.size, self.in_off.size) - 1

    def _count(self, author: int, change: int) -> None:
        if author >= self.in_delta.size:  # geometric growth: appends stay amortised O(1)
            grow = max(author + 1, 2 * self.in_delta.size, 1024) - self.in_delta.size
            self.in_delta = np.concatenate([self.in_delta, np.zeros(grow, dtype=np.int64)])
        self.in_delta[author] += change

    def follows(self, user: int, author: int) -> bool:
        if author in self.removed.get(user, ()):
            return False
        if author in self.added.get(user, ()):
            return True
        base = self._base(self.src_off, self.dst, user)
        i = int(np.searchsorted(base, author))
        return i < base.size and int(base[i]) == author

    def apply(self, user: int, author: int, follow: bool) -> bool:
        """Add or remove one edge; True when it changed the graph."""
        with self.lock:
            if self.follows(user, author) == follow:
                return False
            self._count(author, 1 if follow else -1)
            if follow:
                self.removed[user].discard(author)
                self.removed_in[author].discard(user)
                if author not in self._base(self.src_off, self.dst, user):
                    self.added[user].add(author)
                    self.added_in[author].add(user)
            else:
                self.added[user].discard(author)
                self.added_in[author].discard(user)
                if author in self._base(self.src_off, self.dst, user):
                    self.removed[user].add(author)
                    self.removed_in[author].add(user)
            return True


def load_bootstrap(catalog: PostCatalog, graph: FollowGraph, directory: str | Path) -> dict[str, int]:
    """Fill the catalog and the graph from ``posts.parquet`` / ``follows.parquet`` exports."""
    import pyarrow.parquet as pq

    d = Path(directory)
    out = {"posts": 0, "follows": 0}
    if (d / "posts.parquet").exists():
        t = pq.read_table(d / "posts.parquet", columns=["post_id", "author_id", "topic", "content_type", "is_original",
                                                         "policy_flagged", "ts"]).to_pandas()
        ctype = t["content_type"].map({c: i for i, c in enumerate(CTYPES)}).fillna(0).to_numpy(dtype=np.int64)
        catalog.load(t["post_id"].to_numpy(), t["author_id"].to_numpy(), t["topic"].to_numpy(), ctype,
                     t["is_original"].to_numpy(), t["policy_flagged"].to_numpy(), t["ts"].to_numpy())
        out["posts"] = len(t)
    if (d / "follows.parquet").exists():
        f = pq.read_table(d / "follows.parquet", columns=["user_id", "author_id"])
        graph.load(f.column("user_id").to_numpy(), f.column("author_id").to_numpy())
        out["follows"] = f.num_rows
    return out


class ChangeFollower(StreamFollower):
    """Applies the post and follow change streams to this replica (daemon thread)."""

    name = "change-follower"

    def __init__(self, redis: Any, catalog: PostCatalog, graph: FollowGraph, start: str = "$"):
        self.redis, self.catalog, self.graph = redis, catalog, graph
        self.last = {POST_CHANGES: start, FOLLOW_CHANGES: start}
        self.applied = 0
        self.skipped = 0  # malformed changes (e.g. written by a version that did not validate ids)
        self.loaded = False  # the changes since the export (POSTS_SINCE_EXPORT, FOLLOWS_SINCE_EXPORT)
        self.healthy = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def resolve_start(self) -> None:
        """Turn "$" into concrete ids so nothing written between bootstrap and the first read is lost."""
        for stream in self.last:
            if self.last[stream] == "$":
                info = self.redis.xinfo_stream(stream) if self.redis.exists(stream) else None
                self.last[stream] = info["last-generated-id"].decode() if info else "0-0"

    def load_since_export(self) -> int:
        """Apply every post and follow change recorded since the export (idempotent); returns how many."""
        n = 0
        for pid, raw in self.redis.hscan_iter(POSTS_SINCE_EXPORT, count=10_000):
            c = json.loads(raw)
            self.catalog.add(int(pid), int(c["author_id"]), int(c["topic"]), int(c["ctype"]), bool(c["original"]),
                             bool(c["flagged"]), int(c["published_ms"]))
            n += 1
        for edge, op in self.redis.hscan_iter(FOLLOWS_SINCE_EXPORT, count=10_000):
            user, _, author = edge.partition(b":")
            self.graph.apply(int(user), int(author), op == b"1")
            n += 1
        self.loaded = True
        return n

    def poll(self, block_ms: int | None = None) -> int:
        if not self.loaded:
            self.applied += self.load_since_export()
        got = self.redis.xread(dict(self.last), count=1000, block=block_ms)
        n = 0
        for stream, entries in got or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, f in entries:
                self.last[stream] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    if stream == POST_CHANGES:
                        pid = int(f[b"post_id"])
                        if not 0 <= pid <= self.catalog.n + MAX_ID_STEP:
                            raise ValueError(f"post id {pid} far beyond the known ones")
                        self.catalog.add(pid, int(f[b"author_id"]), int(f[b"topic"]), int(f[b"ctype"]),
                                         f[b"original"] == b"1", f[b"flagged"] == b"1", int(f[b"published_ms"]))
                    else:
                        self.graph.apply(int(f[b"user_id"]), int(f[b"author_id"]), f[b"op"] == b"follow")
                except (KeyError, ValueError, OverflowError, MemoryError) as e:  # one bad entry: skip it, go on
                    self.skipped += 1
                    log.warning("%s: skipped change %s of %s (%s)", self.name, self.last[stream], stream, e)
                    continue
                n += 1
        self.applied += n
        return n


def post_change(post_id: int, author: int, topic: int, ctype: int, original: bool, flagged: bool,
                published_ms: int) -> dict[str, Any]:
    return {"post_id": post_id, "author_id": author, "topic": topic, "ctype": ctype, "original": int(original),
            "flagged": int(flagged), "published_ms": published_ms}


def follow_change(user: int, author: int, follow: bool) -> dict[str, Any]:
    return {"user_id": user, "author_id": author, "op": "follow" if follow else "unfollow"}


def record_post(pipe: Any, change: dict[str, Any], maxlen: int) -> None:
    """Queue a post change on ``pipe``: the stream every replica follows, and the record since the export."""
    pipe.xadd(POST_CHANGES, change, maxlen=maxlen, approximate=True)
    pipe.hset(POSTS_SINCE_EXPORT, str(change["post_id"]), json.dumps(change))


def record_follow(pipe: Any, change: dict[str, Any], maxlen: int) -> None:
    """Queue a follow change on ``pipe``: the stream, and the edge's state since the export."""
    pipe.xadd(FOLLOW_CHANGES, change, maxlen=maxlen, approximate=True)
    pipe.hset(FOLLOWS_SINCE_EXPORT, f"{change['user_id']}:{change['author_id']}", int(change["op"] == "follow"))
