"""The edge: JWT authentication, per-user rate limiting, opaque tamper-evident cursors.

Tokens: ``Authorization: Bearer <jwt>``; HS256 with ``serving.jwt_secret`` or RS256 with
the public key at ``serving.jwt_public_key``. ``sub`` is the user id; a user may only
read and act as itself; ``admin: true`` is required for DebugRanking and lets a service
act for any user. ``exp`` is required.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt


class AuthError(Exception):
    """Missing, malformed, forged or expired credentials (UNAUTHENTICATED)."""


class Forbidden(Exception):
    """Valid credentials that do not allow this call (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Principal:
    user_id: int
    admin: bool

    def may_act_as(self, user_id: int) -> bool:
        return self.admin or self.user_id == user_id


class Authenticator:
    def __init__(self, secret: str, public_key_path: str = ""):
        self.secret = secret
        self.public_key = Path(public_key_path).read_text() if public_key_path else None
        if self.public_key:
            try:
                import cryptography  # noqa: F401 - PyJWT needs it for RS256
            except ImportError:
                raise RuntimeError("serving.jwt_public_key is set but RS256 needs the 'cryptography' package: "
                                   "pip install cryptography") from None

    def principal(self, metadata: Any) -> Principal:
        auth = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if not auth:
            raise AuthError("missing bearer token (metadata 'authorization: Bearer <jwt>')")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("authorization must be 'Bearer <jwt>'")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            if alg == "RS256" and self.public_key:
                claims = jwt.decode(token, self.public_key, algorithms=["RS256"], options={"require": ["exp", "sub"]})
            else:
                claims = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid token: {e}") from None
        try:
            uid = int(claims["sub"])
        except (TypeError, ValueError):
            raise AuthError("token subject must be a user id") from None
        return Principal(uid, bool(claims.get("admin", False)))


def make_token(secret: str, user_id: int, admin: bool = False, ttl_s: float = 3600.0) -> str:
    """An HS256 token for ``user_id`` (tests, the simulated clients, `feedrank token`)."""
    now = int(time.time())
    return jwt.encode({"sub": str(user_id), "admin": admin, "iat": now, "exp": now + int(ttl_s)}, secret,
                      algorithm="HS256")


class RateLimiter:
    """Per-user token buckets: ``rate`` requests/s sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, max_users: int = 200_000):
        self.rate, self.burst, self.max_users = rate, float(burst), max_users
        self.buckets: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, user_id: int, cost: float = 1.0) -> bool:
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(user_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= cost
            self.buckets[user_id] = (tokens - cost if ok else tokens, now)
            if len(self.buckets) > self.max_users:  # drop the idlest half (they are full again anyway)
                for k in sorted(self.buckets, key=lambda k: self.buckets[k][1])[: self.max_users // 2]:
                    del self.buckets[k]
            return ok


class CursorError(ValueError):
    pass


class CursorCodec:
    """``base64(json).hmac``: opaque to clients, any change to it is detected."""

    def __init__(self, secret: str):
        self.key = hashlib.sha256(("cursor:" + secret).encode()).digest()

    def _mac(self, body: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self.key, body, hashlib.sha256).digest()[:16]).decode().rstrip("=")

    def encode(self, data: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode())
        return body.decode().rstrip("=") + "." + self._mac(body.rstrip(b"="))

    def decode(self, cursor: str) -> dict[str, Any]:
        body, _, mac = cursor.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self._mac(body.encode())):
            raise CursorError("invalid cursor (not issued by this service, or altered)")
        try:
            return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except ValueError:
            raise CursorError("invalid cursor") from None
