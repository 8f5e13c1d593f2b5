"""Edge pieces without a server: cursors, token buckets, tokens."""

from __future__ import annotations

import time

import jwt
import pytest

from serving.edge import Authenticator, AuthError, CursorCodec, CursorError, RateLimiter, make_token

SECRET = "a-test-secret-that-is-long-enough-32"


def test_cursor_round_trip_and_tamper_detection():
    c = CursorCodec(SECRET)
    cur = c.encode({"r": "abc", "o": 20, "u": 7, "f": "home"})
    assert c.decode(cur) == {"r": "abc", "o": 20, "u": 7, "f": "home"}
    with pytest.raises(CursorError):
        c.decode(cur.replace(cur[3], "x" if cur[3] != "x" else "y", 1))
    with pytest.raises(CursorError):
        CursorCodec("another-secret-another-secret-xxxx").decode(cur)
    with pytest.raises(CursorError):
        c.decode("garbage")


def test_token_bucket_rate_and_burst():
    r = RateLimiter(rate=10.0, burst=5)
    assert [r.allow(1) for _ in range(6)] == [True] * 5 + [False]
    assert r.allow(2)  # per user
    time.sleep(0.25)
    assert r.allow(1)  # refilled at 10/s


def test_tokens():
    a = Authenticator(SECRET)
    assert a.principal([("authorization", "Bearer " + make_token(SECRET, 42, admin=True))]).admin
    p = a.principal([("authorization", "Bearer " + make_token(SECRET, 42))])
    assert p.user_id == 42 and p.may_act_as(42) and not p.may_act_as(43)
    no_exp = jwt.encode({"sub": "1"}, SECRET, algorithm="HS256")
    for md, msg in (([], "missing"), ([("authorization", "Bearer " + no_exp)], "exp"),
                    ([("authorization", "Bearer " + make_token(SECRET, 1, ttl_s=-5))], "expired"),
                    ([("authorization", "Bearer " + make_token("wrong-secret-wrong-secret-wrong-xx", 1))], "invalid")):
        with pytest.raises(AuthError, match=msg):
            a.principal(md)


def test_rs256_tokens_with_a_configured_public_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    a = Authenticator(SECRET, str(tmp_path / "pub.pem"))
    claims = {"sub": "9", "exp": int(time.time()) + 60}
    good = jwt.encode(claims, key, algorithm="RS256")
    assert a.principal([("authorization", f"Bearer {good}")]).user_id == 9
    assert a.principal([("authorization", "Bearer " + make_token(SECRET, 9))]).user_id == 9  # HS256 still accepted
    with pytest.raises(AuthError, match="invalid"):
        a.principal([("authorization", "Bearer " + jwt.encode(claims, other, algorithm="RS256"))])
    with pytest.raises(AuthError):  # RS256 without a configured key is not accepted
        Authenticator(SECRET).principal([("authorization", f"Bearer {good}")])
