"""Free TCP ports for peers started on this machine (tests, benches) or on a Ray actor's node."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from p2pfl.errors import P2pflError

_HANDED: list[range] = []  # blocks this process handed out: an earlier run's peers may still retry them


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def hold_block(n: int = 1, host: str = "127.0.0.1", share: int = 0, shares: int = 1) -> list[socket.socket]:
    """n consecutive free TCP ports from 10000 up to the ephemeral range, bound on `host` ("": every
    address) and held open until the caller closes them: the kernel hands ephemeral ports to
    outgoing connections (every peer's DEALERs), which could otherwise take a port between this
    check and a later peer's bind. No port is handed out twice in a process, so no run's peers
    listen where an earlier run's peers connected.

    `share` of `shares`: draw only from that disjoint slice of the range, so that processes that
    draw side by side (pytest-xdist workers) never draw the same ports."""
    low, high = 10000, _ephemeral_low() - n - 1
    if shares > 1:
        span = (high - low) // shares
        low += share * span
        high = low + span - n
    for _ in range(200):
        base = random.randint(low, high)
        if any(base < r.stop and r.start < base + n for r in _HANDED):
            continue
        socks: list[socket.socket] = []
        try:
            for k in range(n):
                socks.append(socket.socket())
                socks[-1].bind((host, base + k))
        except OSError:
            for s in socks:
                s.close()
            continue
        _HANDED.append(range(base, base + n))
        return socks
    raise P2pflError(f"no block of {n} free TCP ports on {socket.gethostname()}")


def free_base_port(n: int = 1, share: int = 0, shares: int = 1) -> int:
    """A base port with n consecutive free TCP ports on 127.0.0.1 (`hold_block`), released for the
    peers to bind."""
    socks = hold_block(n, "127.0.0.1", share, shares)
    base = socks[0].getsockname()[1]
    for s in socks:
        s.close()
    return base
