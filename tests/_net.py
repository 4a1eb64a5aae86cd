"""Network helpers shared by the tests that start launchers or services on this machine."""

from __future__ import annotations

import contextlib
import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on now on 127.0.0.1 (other test sessions may run their own launchers on this
    machine); all n sockets stay bound until every port is picked, so no two are the same."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    """One port of `free_ports`."""
    return free_ports(1)[0]
