"""Free TCP ports on 127.0.0.1 for peers started on this machine (tests, benches)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_HANDED: list[range] = []  # blocks this process handed out: an earlier run's peers may still retry them


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port(n: int = 1, share: int = 0, shares: int = 1) -> int:
    """A base port with n consecutive free TCP ports on 127.0.0.1, from 10000 up to the ephemeral
    range: the kernel hands ephemeral ports to outgoing connections (every peer's DEALERs), which
    could otherwise take a port between this check and a later peer's bind. No port is handed out
    twice in a process, so no run's peers listen where an earlier run's peers connected.

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
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k))
                socks.append(s)
            _HANDED.append(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")
