"""The edge: JWT authentication, per-user rate limiting, opaque tamper-evident cursors.

Tokens: ``Authorization: Bearer <jwt>``. Exactly one algorithm is accepted: RS256 with the
public key at ``serving.jwt_public_key`` when one is configured (HS256 tokens are then
refused, whatever they are signed with), else HS256 with ``serving.jwt_secret``. Claims are
checked strictly:

- ``sub``: the user id as a canonical decimal string (``^(0|[1-9][0-9]*)$``, at most 2**63-1):
  ``"4_2"``, ``"042"``, ``" 42"``, ``"-1"`` or a JSON number are refused, never coerced;
- ``exp`` and ``iat`` are required JSON numbers; ``iat`` may be at most ``CLOCK_SKEW_S``
  ahead of this server's clock and ``exp - iat`` at most ``serving.jwt_max_lifetime_s``
  (so no token is valid for longer than that, e.g. no expiry in year 9999);
- ``admin``: absent or a JSON boolean; only ``true`` grants admin (DebugRanking, acting for
  any user). Any other value (``"false"``, ``1``, ``null``) makes the token malformed:
  refused (UNAUTHENTICATED), not read as "not admin", so an issuer bug is loud;
- ``iss`` / ``aud``: required and compared exactly when ``serving.jwt_issuer`` /
  ``serving.jwt_audience`` are set ("" = not checked).

Keys: ``serving.jwt_secret`` and ``serving.cursor_secret`` ship as public placeholders in
``feedrank.toml``; :func:`check_secrets` (run by ``feedrank serve`` before anything starts,
and by the constructors below, so by every FeedService) refuses them, refuses keys shorter
than ``MIN_SECRET_BYTES`` and a cursor key equal to the JWT key. Stacks that a process
builds and owns (the tests, ``feedrank demo``, the benchmarks) use :func:`embedded_auth`:
fresh random keys that only that stack knows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

#: The key values shipped in feedrank.toml. They are public, so nothing serves with them.
PLACEHOLDER_JWT_SECRET = "feedrank-dev-secret-change-me-in-production"
PLACEHOLDER_CURSOR_SECRET = "feedrank-dev-cursor-secret-change-me-in-production"
PLACEHOLDER_SECRETS = frozenset({PLACEHOLDER_JWT_SECRET, PLACEHOLDER_CURSOR_SECRET})
MIN_SECRET_BYTES = 32   # HS256 / HMAC-SHA256 keys: at least the hash's size (RFC 7518 3.2)
MAX_USER_ID = 2**63 - 1  # user ids are int64 on the wire
CLOCK_SKEW_S = 60        # a token's iat may be this far ahead of our clock (the issuer's clock runs ahead)
_CANONICAL_ID = re.compile(r"0|[1-9][0-9]{0,18}")
_MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class AuthError(Exception):
    """Missing, malformed, forged or expired credentials (UNAUTHENTICATED)."""


class Forbidden(Exception):
    """Valid credentials that do not allow this call (PERMISSION_DENIED)."""


class InsecureConfig(RuntimeError):
    """A key that must not be served with (a shipped placeholder, too short, reused)."""


def _secret_problem(key: str, value: str, alternative: str = "") -> str | None:
    env = "FEEDRANK_" + key.replace(".", "_").upper()
    how = f"set {env} (or {key} in the FEEDRANK_CONFIG file){alternative}"
    if value in PLACEHOLDER_SECRETS:
        return f"{key} is the public placeholder shipped in feedrank.toml: {how}"
    if len(value.encode()) < MIN_SECRET_BYTES:
        return f"{key} is shorter than {MIN_SECRET_BYTES} bytes: {how}"
    return None


def _refuse(problems: list[str], doing: str = "refusing to serve") -> None:
    if problems:
        raise InsecureConfig(f"{doing}: " + "; ".join(problems) +
                             f"; use random values of at least {MIN_SECRET_BYTES} bytes, e.g. `{_MAKE_KEY}`")


def check_secrets(cfg: Any) -> None:
    """Raise :class:`InsecureConfig` (one line naming every bad key and how to set it) unless
    ``cfg`` has real keys: the JWT secret (not needed when an RS256 public key is configured)
    and the cursor key, which must differ from the JWT secret."""
    s = cfg.serving
    found = [None if s.jwt_public_key or s.jwt_jwks_url else _secret_problem(
                 "serving.jwt_secret", s.jwt_secret, ", or configure serving.jwt_public_key or jwt_jwks_url (RS256)"),
             _secret_problem("serving.cursor_secret", s.cursor_secret,
                             ", the same value on every replica of a deployment")]
    problems = [p for p in found if p]
    if not problems and s.cursor_secret == s.jwt_secret:
        problems.append("serving.cursor_secret must differ from serving.jwt_secret")
    _refuse(problems)


def embedded_auth() -> dict[str, str]:
    """``FEEDRANK_*`` overrides for a stack this process builds and owns (tests, the demo,
    benchmarks): fresh random HS256 and cursor keys, no RS256 key, no iss/aud. Its servers and
    its simulated clients get them (in-process, or through the environment of its children);
    nobody else knows them."""
    return {"FEEDRANK_SERVING_JWT_SECRET": secrets.token_urlsafe(32),
            "FEEDRANK_SERVING_CURSOR_SECRET": secrets.token_urlsafe(32),
            "FEEDRANK_SERVING_JWT_PUBLIC_KEY": "", "FEEDRANK_SERVING_JWT_JWKS_URL": "", "FEEDRANK_SERVING_JWT_ISSUER": "",
            "FEEDRANK_SERVING_JWT_AUDIENCE": ""}


def with_embedded_auth(cfg: Any) -> Any:
    """``cfg`` with :func:`embedded_auth`'s keys (for a Config already loaded)."""
    env = embedded_auth()
    update = {k[len("FEEDRANK_SERVING_"):].lower(): v for k, v in env.items()}
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update=update)})


def auth_env(cfg: Any) -> dict[str, str]:
    """The ``FEEDRANK_*`` variables that give a child process ``cfg``'s authentication settings."""
    s = cfg.serving
    return {"FEEDRANK_SERVING_JWT_SECRET": s.jwt_secret, "FEEDRANK_SERVING_CURSOR_SECRET": s.cursor_secret,
            "FEEDRANK_SERVING_JWT_PUBLIC_KEY": s.jwt_public_key, "FEEDRANK_SERVING_JWT_JWKS_URL": s.jwt_jwks_url,
            "FEEDRANK_SERVING_JWT_ISSUER": s.jwt_issuer,
            "FEEDRANK_SERVING_JWT_AUDIENCE": s.jwt_audience,
            "FEEDRANK_SERVING_JWT_MAX_LIFETIME_S": str(s.jwt_max_lifetime_s)}


def tls_files(cfg: Any) -> tuple[str, str] | None:
    """(certificate, key) PEM paths when TLS is configured (serving.tls_cert and tls_key), else None;
    :class:`InsecureConfig` when only one is set or either cannot be read."""
    s = cfg.serving
    if not s.tls_cert and not s.tls_key:
        return None
    if not (s.tls_cert and s.tls_key):
        raise InsecureConfig("serving.tls_cert and serving.tls_key must be set together (PEM paths), or neither")
    files = (str(cfg.path(s.tls_cert)), str(cfg.path(s.tls_key)))
    for name, f in zip(("tls_cert", "tls_key"), files):
        if not Path(f).is_file():
            raise InsecureConfig(f"serving.{name}: cannot read {f}")
    return files


def open_channel(cfg: Any, address: str, options: list[tuple[str, Any]] | None = None) -> Any:
    """A gRPC channel to a FeedService of ``cfg``: TLS (trusting serving.tls_ca, or the server's own
    certificate when that is "") when the server has TLS, plaintext otherwise."""
    import grpc

    tls = tls_files(cfg)
    if not tls:
        return grpc.insecure_channel(address, options=options)
    root = Path(cfg.path(cfg.serving.tls_ca) if cfg.serving.tls_ca else tls[0]).read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


@dataclass(frozen=True)
class Principal:
    user_id: int
    admin: bool

    def may_act_as(self, user_id: int) -> bool:
        return self.admin or self.user_id == user_id


def _numeric_date(claims: dict[str, Any], name: str) -> float:
    v = claims.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AuthError(f"invalid token: {name} must be a NumericDate (seconds since the epoch)")
    return float(v)


class KeysUnavailable(RuntimeError):
    """The issuer's JWKS could not be fetched: the server cannot verify tokens now (UNAVAILABLE, not the caller's fault)."""


class Authenticator:
    def __init__(self, secret: str, public_key_path: str = "", *, issuer: str = "", audience: str = "",
                 max_lifetime_s: float = 86400.0, jwks_url: str = "", jwks_cache_s: float = 300.0):
        self.issuer, self.audience, self.max_lifetime_s = issuer, audience, float(max_lifetime_s)
        self.jwks = None
        if jwks_url:  # RS256 keys from the issuer, chosen by each token's kid (PyJWT's cached JWKS client)
            self.jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=int(jwks_cache_s), timeout=5)
            self.key, self.algorithm, self.public_key = None, "RS256", None
            return
        try:
            self.public_key = Path(public_key_path).read_text() if public_key_path else None
        except (OSError, UnicodeDecodeError) as e:
            raise InsecureConfig(f"serving.jwt_public_key: cannot read {public_key_path} ({e})") from None
        if self.public_key:
            try:
                from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
                from cryptography.hazmat.primitives.serialization import load_pem_public_key
            except ImportError:
                raise RuntimeError("serving.jwt_public_key is set but RS256 needs the 'cryptography' package: "
                                   "pip install cryptography") from None
            try:
                key = load_pem_public_key(self.public_key.encode())
            except ValueError:
                raise InsecureConfig(f"serving.jwt_public_key: {public_key_path} is not a PEM public key") from None
            if not isinstance(key, RSAPublicKey):
                raise InsecureConfig(f"serving.jwt_public_key: {public_key_path} is not an RSA public key")
            self.key: Any = key
            self.algorithm = "RS256"  # and only RS256: the HS256 secret is not a credential any more
        else:
            _refuse([p for p in [_secret_problem("serving.jwt_secret", secret,
                                                 ", or configure serving.jwt_public_key (RS256)")] if p])
            self.key, self.algorithm = secret, "HS256"

    @classmethod
    def from_config(cls, cfg: Any) -> "Authenticator":
        s = cfg.serving
        check_secrets(cfg)
        return cls(s.jwt_secret, str(cfg.path(s.jwt_public_key)) if s.jwt_public_key else "", issuer=s.jwt_issuer,
                   audience=s.jwt_audience, max_lifetime_s=s.jwt_max_lifetime_s, jwks_url=s.jwt_jwks_url,
                   jwks_cache_s=s.jwt_jwks_cache_s)

    def principal(self, metadata: Any) -> Principal:
        auth = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if not auth:
            raise AuthError("missing bearer token (metadata 'authorization: Bearer <jwt>')")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("authorization must be 'Bearer <jwt>'")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid token: {e}") from None
        if alg != self.algorithm:
            raise AuthError(f"invalid token: algorithm {str(alg)[:20]!r} is not accepted (only {self.algorithm})")
        required = ["exp", "iat", "sub"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        key = self.key if self.jwks is None else self._jwks_key(token)
        try:
            claims = jwt.decode(token, key, algorithms=[self.algorithm], issuer=self.issuer or None,
                                audience=self.audience or None,
                                options={"require": required, "verify_aud": bool(self.audience),
                                         "verify_iat": False})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid token: {e}") from None
        if not isinstance(claims, dict):
            raise AuthError("invalid token: claims must be a JSON object")
        exp, iat = _numeric_date(claims, "exp"), _numeric_date(claims, "iat")
        now = time.time()
        if exp <= now:
            raise AuthError("token expired")
        if iat > now + CLOCK_SKEW_S:
            raise AuthError("invalid token: issued in the future (iat)")
        if exp - iat > self.max_lifetime_s:
            raise AuthError(f"invalid token: lifetime exp - iat = {exp - iat:.0f} s is over the maximum "
                            f"{self.max_lifetime_s:.0f} s (serving.jwt_max_lifetime_s)")
        sub = claims["sub"]
        if not isinstance(sub, str) or not _CANONICAL_ID.fullmatch(sub) or int(sub) > MAX_USER_ID:
            raise AuthError("invalid token: sub must be a user id in canonical decimal form (e.g. \"42\")")
        admin = claims.get("admin", False)
        if not isinstance(admin, bool):
            raise AuthError("invalid token: the admin claim must be a JSON boolean")
        return Principal(int(sub), admin)


    def _jwks_key(self, token: str) -> Any:
        try:
            return self.jwks.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as e:
            raise KeysUnavailable(f"cannot verify tokens: the JWKS at {self.jwks.uri} is unreachable ({e})") from None
        except jwt.PyJWKClientError as e:  # no kid, or a kid the issuer's set does not hold
            raise AuthError(f"invalid token: {e}") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid token: {e}") from None


def make_token(secret: str, user_id: int, admin: bool = False, ttl_s: float = 3600.0, *, issuer: str = "",
               audience: str = "") -> str:
    """An HS256 token for ``user_id`` (tests, the simulated clients, `feedrank token`); ``iss`` /
    ``aud`` are set when given (see :func:`config_token` for the configured ones)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(int(user_id)), "admin": bool(admin), "iat": now, "exp": now + int(ttl_s)}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def config_token(cfg: Any, user_id: int, admin: bool = False, ttl_s: float = 3600.0) -> str:
    """An HS256 token a server with ``cfg`` accepts: its secret, issuer and audience. Raises
    :class:`InsecureConfig` for a placeholder secret, ValueError when the server would refuse it."""
    s = cfg.serving
    if s.jwt_public_key or s.jwt_jwks_url:
        raise ValueError("serving.jwt_public_key / jwt_jwks_url is set: the server accepts only RS256 tokens from "
                         "your issuer (this mints HS256)")
    _refuse([p for p in [_secret_problem("serving.jwt_secret", s.jwt_secret)] if p], "refusing to sign a token")
    if not 0 < ttl_s <= s.jwt_max_lifetime_s:
        raise ValueError(f"ttl must be > 0 and <= serving.jwt_max_lifetime_s ({s.jwt_max_lifetime_s} s), got {ttl_s:g}")
    if not 0 <= user_id <= MAX_USER_ID:
        raise ValueError(f"user id must be in 0..{MAX_USER_ID}, got {user_id}")
    return make_token(s.jwt_secret, user_id, admin, ttl_s, issuer=s.jwt_issuer, audience=s.jwt_audience)


class RateLimiter:
    """Per-user token buckets: ``rate`` requests/s sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, max_users: int = 200_000):
        self.rate, self.burst, self.max_users = rate, float(burst), max_users
        self.buckets: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def describe(self) -> str:
        return f"{self.rate:g}/s, burst {self.burst:g}"

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


class SharedRateLimiter:
    """Per-user limits that every worker and replica enforces together: at most ``burst`` requests in
    any ``burst / rate`` seconds (rounded, at least 1 s: the sustained rate), counted in Redis by the
    ``limits`` library's moving window (one atomic Lua script per call), so N replicas give a user the
    configured limit, not N times it. While Redis is unavailable (``guard``'s circuit is open) each
    process falls back to its own token bucket, and ``fallbacks`` counts the calls decided that way."""

    def __init__(self, guard: Any, rate: float, burst: int, name: str):
        from limits import RateLimitItemPerSecond
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        from serving.state import RedisUnavailable

        self.unavailable = RedisUnavailable
        self.guard, self.rate, self.burst = guard, float(rate), int(burst)
        self.window_s = max(1, round(self.burst / self.rate)) if self.rate > 0 else 1
        self.item = RateLimitItemPerSecond(self.burst, self.window_s, namespace=name)
        storage = RedisStorage("redis://", connection_pool=guard.client.connection_pool, key_prefix="feedrank:limit")
        self.limiter = MovingWindowRateLimiter(storage)
        self.local = RateLimiter(rate, burst)
        self.fallbacks = 0

    def describe(self) -> str:
        return f"{self.burst} per {self.window_s} s"

    def allow(self, user_id: int, cost: float = 1.0) -> bool:
        try:
            return bool(self.guard.run(lambda r: self.limiter.hit(self.item, str(user_id), cost=int(cost))))
        except self.unavailable:
            self.fallbacks += 1
            return self.local.allow(user_id, cost)


class CursorError(ValueError):
    pass


class CursorCodec:
    """``base64(json).hmac``: opaque to clients, any change to it is detected. The key is
    ``serving.cursor_secret`` (the same on every replica, so a page's cursor works on any of
    them), not the JWT secret: a leaked cursor key cannot mint tokens, nor the reverse."""

    def __init__(self, secret: str):
        _refuse([p for p in [_secret_problem("serving.cursor_secret", secret)] if p])
        self.key = hashlib.sha256(("cursor:" + secret).encode()).digest()

    @classmethod
    def from_config(cls, cfg: Any) -> "CursorCodec":
        check_secrets(cfg)
        return cls(cfg.serving.cursor_secret)

    def _mac(self, body: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self.key, body, hashlib.sha256).digest()[:16]).decode().rstrip("=")

    def encode(self, data: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode())
        return body.decode().rstrip("=") + "." + self._mac(body.rstrip(b"="))

    def decode(self, cursor: str) -> dict[str, Any]:
        if not isinstance(cursor, str) or not cursor.isascii():
            raise CursorError("invalid cursor (not issued by this service, or altered)")
        body, _, mac = cursor.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self._mac(body.encode())):
            raise CursorError("invalid cursor (not issued by this service, or altered)")
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except ValueError:
            raise CursorError("invalid cursor") from None
        if not isinstance(data, dict):
            raise CursorError("invalid cursor")
        return data
