"""Network helpers shared by the tests that start launchers or services on this machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now on 127.0.0.1 (other test sessions may run their own launchers on this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
