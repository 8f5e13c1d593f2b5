"""Edge pieces without a server: cursors, token buckets, tokens, keys (and `feedrank serve` / `token`
refusing the shipped placeholder keys)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from serving.edge import (Authenticator, AuthError, CursorCodec, CursorError, InsecureConfig, RateLimiter,
                          check_secrets, config_token, make_token)

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
    claims = {"sub": "9", "iat": int(time.time()), "exp": int(time.time()) + 60}
    good = jwt.encode(claims, key, algorithm="RS256")
    assert a.principal([("authorization", f"Bearer {good}")]).user_id == 9
    with pytest.raises(AuthError, match="algorithm 'HS256' is not accepted"):  # HS256 refused under RS256
        a.principal([("authorization", "Bearer " + make_token(SECRET, 9))])
    with pytest.raises(AuthError, match="invalid"):
        a.principal([("authorization", "Bearer " + jwt.encode(claims, other, algorithm="RS256"))])
    with pytest.raises(AuthError):  # RS256 without a configured key is not accepted
        Authenticator(SECRET).principal([("authorization", f"Bearer {good}")])


# ----------------------------------------------------------------------------- issue 15: keys and strict claims

def _rsa_pair(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "pub.pem"
    path.write_bytes(pem)
    return key, pem, path


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _claims(**over):
    now = int(time.time())
    c = {"sub": "42", "iat": now, "exp": now + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not _DROP}


_DROP = object()
NOW = int(time.time())
Y9999 = 253402300799  # 9999-12-31T23:59:59Z

#: what an attacker (or a buggy issuer) signs with the real key; none of it may authenticate
FORGED_CLAIMS = {
    'admin: "false"': _claims(admin="false"),
    'admin: "true"': _claims(admin="true"),
    "admin: 1": _claims(admin=1),
    "admin: 0": _claims(admin=0),
    "admin: null": _claims(admin=None),
    'admin: ["true"]': _claims(admin=[True]),
    "exp in year 9999": _claims(exp=Y9999),
    "exp - iat one second over the maximum": _claims(iat=NOW, exp=NOW + 86401),
    "exp and iat in year 9999": _claims(iat=Y9999 - 60, exp=Y9999),
    "no iat": _claims(iat=_DROP),
    "no exp": _claims(exp=_DROP),
    "iat a string": _claims(iat=str(NOW)),
    "exp a string": _claims(exp=str(NOW + 600)),
    "iat true": _claims(iat=True),
    "no sub": _claims(sub=_DROP),
    'sub: "4_2"': _claims(sub="4_2"),
    'sub: "042"': _claims(sub="042"),
    'sub: "-1"': _claims(sub="-1"),
    'sub: " 42"': _claims(sub=" 42"),
    'sub: "42 "': _claims(sub="42 "),
    'sub: "42\\n"': _claims(sub="42\n"),
    'sub: "+42"': _claims(sub="+42"),
    'sub: "\\u0664\\u0662" (Arabic-Indic 42)': _claims(sub="\u0664\u0662"),
    'sub: "1e3"': _claims(sub="1e3"),
    'sub: ""': _claims(sub=""),
    "sub: 2**63": _claims(sub=str(2**63)),
    "sub: a number": _claims(sub=42),
}


@pytest.mark.parametrize("what", FORGED_CLAIMS)
def test_forged_claims_signed_with_the_real_key_are_refused(what):
    a = Authenticator(SECRET)
    with pytest.raises(AuthError, match="invalid|expired|missing") as e:
        a.principal(_bearer(jwt.encode(FORGED_CLAIMS[what], SECRET, algorithm="HS256")))
    assert "invalid token" in str(e.value) or "expired" in str(e.value), str(e.value)


def test_what_strict_claims_still_accept():
    a = Authenticator(SECRET)
    p = a.principal(_bearer(make_token(SECRET, 42)))
    assert p == a.principal(_bearer(jwt.encode(_claims(), SECRET, algorithm="HS256")))
    assert p.user_id == 42 and not p.admin
    assert not a.principal(_bearer(jwt.encode(_claims(admin=False), SECRET, algorithm="HS256"))).admin
    assert a.principal(_bearer(jwt.encode(_claims(admin=True), SECRET, algorithm="HS256"))).admin
    for sub in ("0", "7", str(2**63 - 1)):
        assert a.principal(_bearer(jwt.encode(_claims(sub=sub), SECRET, algorithm="HS256"))).user_id == int(sub)
    # exactly the maximum lifetime; an issuer clock a little ahead of ours; fractional NumericDates
    assert a.principal(_bearer(jwt.encode(_claims(iat=NOW, exp=NOW + 86400), SECRET, algorithm="HS256")))
    assert a.principal(_bearer(jwt.encode(_claims(iat=int(time.time()) + 30), SECRET, algorithm="HS256")))
    with pytest.raises(AuthError, match="future"):
        a.principal(_bearer(jwt.encode(_claims(iat=int(time.time()) + 600), SECRET, algorithm="HS256")))
    assert a.principal(_bearer(jwt.encode(_claims(iat=time.time(), exp=time.time() + 60.5), SECRET,
                                          algorithm="HS256")))
    short = Authenticator(SECRET, max_lifetime_s=60)
    with pytest.raises(AuthError, match="jwt_max_lifetime_s"):
        short.principal(_bearer(make_token(SECRET, 42, ttl_s=3600)))


def test_algorithm_confusion_and_none_are_refused_under_rs256(tmp_path):
    key, pem, path = _rsa_pair(tmp_path)
    a = Authenticator(SECRET, str(path))
    assert a.principal(_bearer(jwt.encode(_claims(), key, algorithm="RS256"))).user_id == 42
    unsigned = jwt.api_jws.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode() + "." + \
        jwt.api_jws.base64url_encode(json.dumps(_claims(admin=True)).encode()).decode() + "."
    hs_with_pem = jwt.api_jws.base64url_encode(b'{"alg":"HS256","typ":"JWT"}') + b"." + \
        jwt.api_jws.base64url_encode(json.dumps(_claims(admin=True)).encode())
    sig = hmac.new(pem, hs_with_pem, hashlib.sha256).digest()  # the public key as an HMAC secret
    confused = (hs_with_pem + b"." + jwt.api_jws.base64url_encode(sig)).decode()
    for what, tok in (("HS256 with the jwt_secret", jwt.encode(_claims(admin=True), SECRET, algorithm="HS256")),
                      ("HS256 keyed with the public key", confused), ("alg none", unsigned),
                      ("make_token", make_token(SECRET, 42, admin=True))):
        with pytest.raises(AuthError, match="not accepted"):
            a.principal(_bearer(tok))
    # the HS256 authenticator refuses RS256, however well signed
    with pytest.raises(AuthError, match="not accepted"):
        Authenticator(SECRET).principal(_bearer(jwt.encode(_claims(), key, algorithm="RS256")))
    with pytest.raises(InsecureConfig, match="not a PEM public key"):
        (tmp_path / "bad.pem").write_text("not a key")
        Authenticator(SECRET, str(tmp_path / "bad.pem"))
    with pytest.raises(InsecureConfig, match="cannot read"):
        Authenticator(SECRET, str(tmp_path / "missing.pem"))


def test_issuer_and_audience_when_configured():
    a = Authenticator(SECRET, issuer="https://login.example", audience="feedrank")
    ok = make_token(SECRET, 42, issuer="https://login.example", audience="feedrank")
    assert a.principal(_bearer(ok)).user_id == 42
    for what, kw in (("wrong iss", dict(issuer="https://evil.example", audience="feedrank")),
                     ("wrong aud", dict(issuer="https://login.example", audience="other-service")),
                     ("no iss", dict(audience="feedrank")), ("no aud", dict(issuer="https://login.example")),
                     ("neither", {})):
        with pytest.raises(AuthError, match="invalid token"):
            a.principal(_bearer(make_token(SECRET, 42, **kw)))
    # not configured: not checked
    assert Authenticator(SECRET).principal(_bearer(ok)).user_id == 42


def test_placeholder_and_weak_keys_are_refused():
    from serving.edge import PLACEHOLDER_CURSOR_SECRET, PLACEHOLDER_JWT_SECRET

    for make in (Authenticator, CursorCodec):
        for bad, msg in ((PLACEHOLDER_JWT_SECRET, "placeholder"), (PLACEHOLDER_CURSOR_SECRET, "placeholder"),
                         ("short-but-8-bytes", "shorter than 32 bytes")):
            with pytest.raises(InsecureConfig, match=msg):
                make(bad)


def test_the_shipped_defaults_cannot_serve(make_cfg, tmp_path):
    from core.config import load_config
    from serving.edge import PLACEHOLDER_SECRETS
    from serving.service import FeedService

    shipped = load_config({"FEEDRANK_PATHS_DATA_DIR": str(tmp_path)})
    assert {shipped.serving.jwt_secret, shipped.serving.cursor_secret} <= PLACEHOLDER_SECRETS
    with pytest.raises(InsecureConfig) as e:
        check_secrets(shipped)
    msg = str(e.value)
    assert "\n" not in msg and "FEEDRANK_SERVING_JWT_SECRET" in msg and "FEEDRANK_SERVING_CURSOR_SECRET" in msg
    assert "serving.jwt_public_key" in msg
    # the guard is on the serving path itself: FeedService (so every Server) refuses before anything else
    with pytest.raises(InsecureConfig):
        FeedService(shipped, None, None, None, None)
    for make in (Authenticator.from_config, CursorCodec.from_config):
        with pytest.raises(InsecureConfig):
            make(shipped)
    # one key real, the other still the placeholder: still refused, naming only that one
    half = make_cfg(FEEDRANK_SERVING_CURSOR_SECRET=shipped.serving.cursor_secret)
    with pytest.raises(InsecureConfig, match="cursor_secret") as e:
        check_secrets(half)
    assert "jwt_secret is" not in str(e.value)
    same = make_cfg(FEEDRANK_SERVING_CURSOR_SECRET=make_cfg().serving.jwt_secret)
    with pytest.raises(InsecureConfig, match="must differ"):
        check_secrets(same)


def test_rs256_deployments_need_no_hs256_secret_but_a_cursor_key(make_cfg, tmp_path):
    from serving.edge import PLACEHOLDER_JWT_SECRET

    key, _, path = _rsa_pair(tmp_path)
    cfg = make_cfg(FEEDRANK_SERVING_JWT_PUBLIC_KEY=str(path), FEEDRANK_SERVING_JWT_SECRET=PLACEHOLDER_JWT_SECRET)
    check_secrets(cfg)
    a = Authenticator.from_config(cfg)
    assert a.principal(_bearer(jwt.encode(_claims(), key, algorithm="RS256"))).user_id == 42
    with pytest.raises(AuthError, match="not accepted"):  # the placeholder mints nothing
        a.principal(_bearer(make_token(PLACEHOLDER_JWT_SECRET, 0, admin=True)))
    with pytest.raises(ValueError, match="RS256"):
        config_token(cfg, 42)


def test_embedded_stacks_get_their_own_random_keys(make_cfg, cfg):
    from core.config import load_config
    from serving.edge import auth_env, embedded_auth, with_embedded_auth

    assert make_cfg().serving.jwt_secret == cfg.serving.jwt_secret  # one stack (test): one key
    check_secrets(cfg)
    a, b = embedded_auth(), embedded_auth()
    assert a["FEEDRANK_SERVING_JWT_SECRET"] != b["FEEDRANK_SERVING_JWT_SECRET"]
    assert a["FEEDRANK_SERVING_JWT_SECRET"] != a["FEEDRANK_SERVING_CURSOR_SECRET"]
    demo = with_embedded_auth(cfg)
    check_secrets(demo)
    assert demo.serving.jwt_secret != cfg.serving.jwt_secret and demo.serving.jwt_public_key == ""
    # what the demo passes to its `feedrank serve` child is what its clients sign with
    child = load_config({"FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir), **auth_env(demo)})
    assert child.serving == demo.serving
    tok = config_token(demo, 42, admin=True)
    p = Authenticator.from_config(child).principal(_bearer(tok))
    assert p.user_id == 42 and p.admin
    with pytest.raises(AuthError):
        Authenticator.from_config(cfg).principal(_bearer(tok))


def test_config_token_carries_iss_aud_and_respects_the_lifetime(make_cfg):
    cfg = make_cfg(FEEDRANK_SERVING_JWT_ISSUER="feedrank-login", FEEDRANK_SERVING_JWT_AUDIENCE="feedrank",
                   FEEDRANK_SERVING_JWT_MAX_LIFETIME_S="600")
    p = Authenticator.from_config(cfg).principal(_bearer(config_token(cfg, 42, ttl_s=600)))
    assert p.user_id == 42 and not p.admin
    for ttl in (601, 0, -5):
        with pytest.raises(ValueError, match="jwt_max_lifetime_s"):
            config_token(cfg, 42, ttl_s=ttl)


def test_cursor_key_is_not_the_jwt_key(cfg):
    ours = CursorCodec.from_config(cfg)
    cur = ours.encode({"r": "abc", "o": 20, "u": 7, "f": "home"})
    assert ours.decode(cur)["o"] == 20
    with pytest.raises(CursorError):  # a cursor keyed by the JWT secret (the old derivation) is not ours
        ours.decode(CursorCodec(cfg.serving.jwt_secret).encode({"r": "abc", "o": 20, "u": 7, "f": "home"}))
    for junk in ("\u00e9\u00e9.\u00e9", cur + "\u00e9", ".", "a.b"):
        with pytest.raises(CursorError):
            ours.decode(junk)
    body = base64.urlsafe_b64encode(b"[1,2]").decode().rstrip("=")  # a valid MAC over a non-object
    with pytest.raises(CursorError):
        ours.decode(body + "." + ours._mac(body.encode()))


def _feedrank() -> list[str]:
    import shutil
    import sys
    from pathlib import Path

    exe = shutil.which("feedrank", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "feedrank.cli"]


def _cli_env(tmp_path, **extra):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env["FEEDRANK_PATHS_DATA_DIR"] = str(tmp_path / "var")
    env["FEEDRANK_REDIS"] = "redis://127.0.0.1:1/0"  # nothing there: the refusal must come first
    env.update(extra)
    return env


def test_feedrank_serve_refuses_the_placeholder_in_one_line(tmp_path):
    import subprocess

    for workers in ("1", "2"):
        r = subprocess.run(_feedrank() + ["serve", "--workers", workers, "--world", str(tmp_path / "none")],
                           capture_output=True, text=True, env=_cli_env(tmp_path, COLUMNS="40"), timeout=120)
        assert r.returncode == 2, (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "refusing to serve" in lines[0], r.stderr
        assert "FEEDRANK_SERVING_JWT_SECRET" in lines[0] and "jwt_public_key" in lines[0]
    r = subprocess.run(_feedrank() + ["token", "0", "--admin"], capture_output=True, text=True,
                       env=_cli_env(tmp_path), timeout=120)
    assert r.returncode == 2 and not r.stdout and "placeholder" in r.stderr, (r.stdout, r.stderr)


def test_feedrank_token_with_configured_keys(tmp_path):
    import subprocess

    from core.config import load_config
    from serving.edge import embedded_auth

    env = _cli_env(tmp_path, **{**embedded_auth(), "FEEDRANK_SERVING_JWT_ISSUER": "feedrank-login"})
    r = subprocess.run(_feedrank() + ["token", "42"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    p = Authenticator.from_config(load_config(env)).principal(_bearer(r.stdout.strip()))
    assert p.user_id == 42 and not p.admin
    r = subprocess.run(_feedrank() + ["token", "42", "--ttl-s", "100000"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "jwt_max_lifetime_s" in r.stderr, r.stderr


def test_the_rate_limit_is_shared_by_every_process_on_one_redis(cfg):
    """Three limiters (as three replicas: each its own Redis connection) allow a user ``burst`` requests in all,
    not per replica; another user is untouched; with Redis down each falls back to its own bucket."""
    from runtime import stack
    from serving.edge import SharedRateLimiter
    from serving.state import RedisGuard

    stack.up(cfg)
    try:
        replicas = [SharedRateLimiter(RedisGuard(cfg.redis.uri), rate=2.0, burst=10, name="t") for _ in range(3)]
        assert replicas[0].window_s == 5 and replicas[0].describe() == "10 per 5 s"
        allowed = sum(replicas[i % 3].allow(42) for i in range(30))
        assert allowed == 10
        assert replicas[1].allow(43)
        assert not replicas[2].allow(44, cost=11)  # more than the burst at once is never allowed
        stack.down(cfg)
        assert replicas[0].allow(42) and replicas[0].fallbacks == 1
    finally:
        stack.down(cfg)
