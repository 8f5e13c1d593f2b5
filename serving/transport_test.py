"""Transport security and tracing: GetFeed over TLS (gRPC and HTTPS) with a certificate the test
creates, plaintext refused on the TLS port; the spans of one GetFeed collected in memory; RS256
tokens verified with keys from a JWKS URL served over real HTTP."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import grpc
import jwt
import pytest
import requests

from core.services import free_port
from serving.conftest import running_server, token
from serving.protos import pb, rpc

pytestmark = pytest.mark.slow


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def spans() -> Iterator[Any]:
    """Every span this process records while the module runs, in memory."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    exporter.shutdown()  # the provider stays installed for the process; nothing is kept from here on


@pytest.fixture(scope="module")
def tls_server(served_world, spans, tmp_path_factory) -> Iterator[Any]:
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    with running_server(served_world, FEEDRANK_SERVING_TLS_CERT=str(cert), FEEDRANK_SERVING_TLS_KEY=str(key),
                        FEEDRANK_SERVING_HTTP_PORT=str(free_port())) as server:
        server.cert = cert
        yield server


def test_get_feed_over_tls_and_https_with_a_certificate_the_test_made(tls_server):
    from serving.edge import open_channel

    user = 300
    with open_channel(tls_server.cfg, tls_server.address) as ch:
        r = rpc.FeedServiceStub(ch).GetFeed(pb.GetFeedRequest(user_id=user, feed_type=pb.HOME, limit=5),
                                            metadata=token(tls_server.cfg, user), timeout=30)
    assert len(r.items) == 5 and not r.degraded
    with grpc.insecure_channel(tls_server.address) as ch:  # plaintext on the TLS port: no answer
        with pytest.raises(grpc.RpcError) as e:
            rpc.FeedServiceStub(ch).GetFeed(pb.GetFeedRequest(user_id=user), metadata=token(tls_server.cfg, user),
                                            timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    url = f"https://127.0.0.1:{tls_server.http.port}/api/v1/feed"
    auth = {"Authorization": token(tls_server.cfg, user + 1)[0][1]}
    got = requests.get(url, params={"limit": 5}, headers=auth, verify=str(tls_server.cert), timeout=30)
    assert got.status_code == 200 and len(got.json()["items"]) == 5
    with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust the certificate
        requests.get(url, headers=auth, timeout=30)


def test_one_get_feed_is_a_trace_of_its_pipeline_sources_and_stages(tls_server, spans):
    from serving.edge import open_channel

    user = 310
    spans.clear()
    with open_channel(tls_server.cfg, tls_server.address) as ch:
        r = rpc.FeedServiceStub(ch).GetFeed(pb.GetFeedRequest(user_id=user, feed_type=pb.HOME),
                                            metadata=token(tls_server.cfg, user), timeout=30)
    deadline = time.time() + 5
    while not any(s.name == "feedrank.GetFeed" for s in spans.get_finished_spans()) and time.time() < deadline:
        time.sleep(0.05)
    done = spans.get_finished_spans()
    root = next(s for s in done if s.name == "feedrank.GetFeed")
    assert root.attributes["feedrank.request_id"] == r.request_id and root.attributes["feedrank.items"] == len(r.items)
    mine = [s for s in done if s.context.trace_id == root.context.trace_id]
    by_name = {s.name: s for s in mine}
    pipeline = by_name["pipeline:HOME"]
    assert pipeline.parent.span_id == root.context.span_id
    sources = by_name["sources"]
    assert sources.parent.span_id == pipeline.context.span_id
    for src in ("FollowGraphSource", "AnnSource", "TrendingSource", "AdSource"):
        s = by_name[f"source:{src}"]
        assert s.parent.span_id == sources.context.span_id  # run in the source pool, parented to the request
    assert by_name["source:AnnSource"].attributes["candidates"] > 0
    for stage in ("LightFeatureHydrator", "LightRankerScorer", "HeavyFeatureHydrator", "HeavyRankerScorer",
                  "RerankSelector"):
        s = by_name[stage]
        assert s.parent.span_id == pipeline.context.span_id and s.attributes["candidates_in"] > 0
    cut, cfg = by_name["TopKSelector(light_score)"].attributes, tls_server.cfg
    assert cut["candidates_out"] <= cfg.funnel.light_k + cfg.candidates.ads_per_request < cut["candidates_in"]
    assert all(root.start_time <= s.start_time and s.end_time <= root.end_time for s in mine)


class _Jwks(BaseHTTPRequestHandler):
    body = b"{}"
    fetches = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).fetches += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def test_rs256_tokens_are_verified_with_the_key_their_kid_names_in_a_jwks_url():
    from cryptography.hazmat.primitives.asymmetric import rsa

    from serving.edge import Authenticator, AuthError, KeysUnavailable, make_token

    keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2")}
    jwks = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), "kid": kid, "use": "sig",
                      "alg": "RS256"} for kid, k in keys.items()]}
    _Jwks.body = json.dumps(jwks).encode()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
    try:
        auth = Authenticator("", jwks_url=url)
        now = int(time.time())

        def rs256(kid: str, key: Any, sub: str = "42") -> list[tuple[str, str]]:
            t = jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, key, algorithm="RS256", headers={"kid": kid})
            return [("authorization", "Bearer " + t)]

        assert auth.principal(rs256("k1", keys["k1"])).user_id == 42
        assert auth.principal(rs256("k2", keys["k2"], "7")).user_id == 7
        with pytest.raises(AuthError, match="invalid token"):  # signed with k2's key but naming k1
            auth.principal(rs256("k1", keys["k2"]))
        with pytest.raises(AuthError):  # a kid the issuer's set does not hold
            auth.principal(rs256("k9", keys["k1"]))
        with pytest.raises(AuthError, match="algorithm"):  # HS256 is not accepted once keys come from a JWKS
            auth.principal([("authorization", "Bearer " + make_token("x" * 40, 42))])
        assert _Jwks.fetches <= 3  # cached: not one fetch per token
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(KeysUnavailable, match="unreachable"):  # the issuer is down: the server cannot verify
        Authenticator("", jwks_url=url).principal(rs256("k1", keys["k1"]))
