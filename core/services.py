"""What every layer needs to say about local services: the error of one that cannot start or be
reached, and free / open TCP ports on loopback."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path


class ServiceError(RuntimeError):
    """A service could not be started, or is not healthy."""


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_handed_out: set[int] = set()
_rng = random.Random(os.urandom(8))


def ephemeral_port_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections, port-0 binds)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and ephemeral services), never one handed out
    before by this process. It lies below the kernel's ephemeral range: a port from that range can be
    taken, between this call and the service's bind, by any outgoing connection or port-0 bind (a
    Kafka client, Flink's JVMs), which made a server started a minute later fail to bind."""
    low = ephemeral_port_low()
    if low > 20_000:
        for _ in range(200):
            port = _rng.randrange(10_000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # a machine with no room below its ephemeral range
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port
