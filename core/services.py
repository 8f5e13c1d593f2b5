"""What every layer needs to say about local services: the error of one that cannot start or be
reached, and free / open TCP ports on loopback."""

from __future__ import annotations

import socket


class ServiceError(RuntimeError):
    """A service could not be started, or is not healthy."""


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and ephemeral services)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
