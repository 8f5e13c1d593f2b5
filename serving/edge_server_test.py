"""Forged tokens and foreign cursors against a real FeedService over gRPC (issue 15: the shipped
secret opens nothing, claims are strict, HS256 is refused once RS256 is configured)."""

from __future__ import annotations

import time

import grpc
import jwt
import pytest

from serving.conftest import token
from serving.edge import PLACEHOLDER_JWT_SECRET, Authenticator, CursorCodec
from serving.protos import pb

pytestmark = pytest.mark.slow


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def _md(tok: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {tok}")]


def _signed(secret, alg="HS256", **over) -> str:
    now = int(time.time())
    claims = {"sub": "42", "iat": now, "exp": now + 600, **over}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm=alg)


def test_forged_claims_over_grpc(stub, serving):
    from serving.edge import make_token

    s = serving.cfg.serving.jwt_secret
    assert s != PLACEHOLDER_JWT_SECRET  # the test stack has its own key
    feed42 = pb.GetFeedRequest(user_id=42, limit=5)
    assert stub.GetFeed(feed42, metadata=token(serving.cfg, 42)).items  # the honest token works
    debug = pb.DebugRankingRequest(user_id=42, post_id=1)
    forged = {
        "signed with the shipped placeholder, admin": make_token(PLACEHOLDER_JWT_SECRET, 42, admin=True),
        'admin: "false"': _signed(s, admin="false"),
        "admin: 1": _signed(s, admin=1),
        "exp in year 9999": _signed(s, exp=253402300799),
        "no iat": _signed(s, iat=None),
        'sub: "4_2"': _signed(s, sub="4_2"),
        'sub: "042"': _signed(s, sub="042"),
        'sub: " 42"': _signed(s, sub=" 42"),
    }
    for what, tok in forged.items():
        for call in (lambda: stub.GetFeed(feed42, metadata=_md(tok)), lambda: stub.DebugRanking(debug, metadata=_md(tok))):
            code, msg = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (what, code, msg)
    code, msg = _code(lambda: stub.GetFeed(pb.GetFeedRequest(user_id=0, limit=5), metadata=_md(_signed(s, sub="-1"))))
    assert code == grpc.StatusCode.UNAUTHENTICATED, msg
    # admin: false (a real boolean) is a valid token that is simply not admin
    code, msg = _code(lambda: stub.DebugRanking(debug, metadata=_md(_signed(s, admin=False))))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in msg


def test_a_cursor_signed_with_the_jwt_key_is_refused(stub, serving):
    page = stub.GetFeed(pb.GetFeedRequest(user_id=43, limit=5), metadata=token(serving.cfg, 43))
    assert page.next_cursor
    assert stub.GetFeed(pb.GetFeedRequest(user_id=43, limit=5, cursor=page.next_cursor),
                        metadata=token(serving.cfg, 43)).items
    data = CursorCodec(serving.cfg.serving.cursor_secret).decode(page.next_cursor)
    foreign = CursorCodec(serving.cfg.serving.jwt_secret).encode(data)
    code, msg = _code(lambda: stub.GetFeed(pb.GetFeedRequest(user_id=43, limit=5, cursor=foreign),
                                           metadata=token(serving.cfg, 43)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cursor" in msg


def test_hs256_is_refused_once_rs256_is_configured(stub, serving, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = serving.cfg.model_copy(update={"serving": serving.cfg.serving.model_copy(
        update={"jwt_public_key": str(tmp_path / "pub.pem")})})
    before = serving.service.auth
    serving.service.auth = Authenticator.from_config(cfg)  # the server as `serving.jwt_public_key` makes it
    try:
        req = pb.GetFeedRequest(user_id=44, limit=5)
        assert stub.GetFeed(req, metadata=_md(_signed(key, "RS256", sub="44"))).items
        for what, md in (("HS256 with the configured secret", token(serving.cfg, 44)),
                         ("HS256 admin", token(serving.cfg, 0, admin=True))):
            code, msg = _code(lambda: stub.GetFeed(req, metadata=md))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "RS256" in msg, (what, code, msg)
    finally:
        serving.service.auth = before
