"""The gRPC load balancer in front of `feedrank serve --replicas N`: Debian's nginx with ``grpc_pass``.

nginx terminates each client's HTTP/2 connection and sends every call (a stream) to the next
replica in turn over kept-alive upstream connections, so consecutive calls of one client land
on different replicas: what the replicas share (rate limits, rankings behind cursors and
refreshes, seen / hidden / fatigue state) lives in Redis. A replica that refuses connections
(down, restarting) is skipped for ``fail_timeout``; a replica that is up but not ready says
NOT_SERVING on its own health endpoint (nginx's open-source build does no active gRPC health
checks, so the supervisor starts nginx once every replica is ready). Its configuration, logs and
pid live under ``var/nginx/``.
"""

from __future__ import annotations

import getpass
import os
import shutil
from pathlib import Path

from core.services import ServiceError

INSTALL_HINT = "apt-get install -y nginx (Debian's build has the grpc module)"


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not path:
        raise ServiceError(f"nginx not found (the gRPC load balancer of --replicas): {INSTALL_HINT}")
    return path


def nginx_conf(listen: str, upstreams: list[str], home: Path, read_timeout_s: float = 30.0,
               http: tuple[str, list[str]] | None = None, tls: tuple[str, str] | None = None) -> str:
    """An nginx configuration that balances gRPC calls on ``listen`` over ``upstreams`` (host:port each),
    and with ``http`` = (listen, upstreams) the HTTP API likewise; with ``tls`` = (certificate, key)
    it serves TLS with them and speaks TLS to the replicas (which serve it too)."""
    tmp = home / "tmp"
    ssl = " ssl" if tls else ""
    certs = f"\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};" if tls else ""
    grpc_scheme, http_scheme = ("grpcs", "https") if tls else ("grpc", "http")
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=2s;" for u in upstreams)
    http_block = "" if http is None else "\n".join([
        "    upstream feedrank_http {",
        *(f"        server {u} max_fails=1 fail_timeout=2s;" for u in http[1]),
        "        keepalive 64;",
        "    }",
        "    server {",
        f"        listen {http[0]}{ssl};{certs}",
        "        location / {",
        f"            proxy_pass {http_scheme}://feedrank_http;",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        f"            proxy_read_timeout {read_timeout_s:g}s;",
        "            proxy_next_upstream error timeout;",
        "        }",
        "    }",
    ]) + "\n"
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""  # root's workers would run as nobody
    return f"""{user}worker_processes 1;
error_log {home}/error.log warn;
pid {home}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream feedrank_replicas {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {listen}{ssl} http2;{certs}
        http2_max_concurrent_streams 1024;
        location / {{
            grpc_pass {grpc_scheme}://feedrank_replicas;
            grpc_read_timeout {read_timeout_s:g}s;
            grpc_send_timeout {read_timeout_s:g}s;
            grpc_next_upstream error timeout;  # a replica that refuses the connection: the next one
        }}
    }}
{http_block}}}
"""


def nginx_command(listen: str, upstreams: list[str], home: Path, http: tuple[str, list[str]] | None = None,
                  tls: tuple[str, str] | None = None) -> list[str]:
    """Write ``home``/nginx.conf and return the command that runs nginx on it in the foreground."""
    binary = nginx_binary()
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(nginx_conf(listen, upstreams, home, http=http, tls=tls))
    return [binary, "-p", str(home), "-c", str(conf), "-g", "daemon off;"]
