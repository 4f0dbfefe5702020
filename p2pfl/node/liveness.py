"""Whether a peer's contacts are alive: heard from within the timeout, and not said goodbye.

Two kinds of contact, with opposite defaults:
- `Liveness`: the neighbours of a static graph. Down until heard from (the start-up hellos bring
  them up); a goodbye or a silence longer than `--peer-timeout` takes one down again.
- `OverlayLiveness`: PPFM overlay peers that are not graph neighbours. Up until proven down: the
  clusters decide who they are, and a peer cannot wait for a hello from everyone it is told to
  gossip with; the silence clock starts at the first message to or from one.

Pure: time is an argument. A peer taken down is returned to the caller, which flushes its queue.
"""

from __future__ import annotations

import logging
import math


class Liveness:
    def __init__(self, me: int, peers: list[int], timeout: float, log: logging.Logger) -> None:
        self.me, self.peers, self.timeout, self.log = me, peers, timeout, log
        self.live: set[int] = set()
        self.last_seen: dict[int, float] = {}

    def seen(self, peer: int, now: float, alive: bool = True) -> bool:
        """A message from `peer` (a goodbye if not `alive`); True if that took it down."""
        self.last_seen[peer] = now if alive else -math.inf
        if alive and peer not in self.live:
            self.live.add(peer)
            self.log.info("peer %d: neighbour %d is up", self.me, peer)
        elif not alive and peer in self.live:
            self.live.discard(peer)
            self.log.info("peer %d: neighbour %d said goodbye", self.me, peer)
            return True
        return False

    def expire(self, now: float) -> list[int]:
        """Live neighbours silent for longer than the timeout: now down."""
        down = [j for j in sorted(self.live) if now - self.last_seen.get(j, -math.inf) > self.timeout]
        for j in down:
            self.live.discard(j)
            self.log.warning("peer %d: neighbour %d is down (silent for %.1fs); its weight moves to self", self.me, j, self.timeout)
        return down

    def drop(self, peer: int) -> bool:
        """Take a neighbour out (it misbehaves); True if it was live."""
        if peer in self.live:
            self.live.discard(peer)
            return True
        return False


class OverlayLiveness:
    def __init__(self, me: int, timeout: float, log: logging.Logger) -> None:
        self.me, self.timeout, self.log = me, timeout, log
        self.seen_at: dict[int, float] = {}
        self.down: set[int] = set()

    def contact(self, peer: int, now: float) -> None:
        """A message went to `peer`: its silence is counted from now on, unless it already is."""
        self.seen_at.setdefault(peer, now)

    def heard(self, peer: int, now: float, alive: bool) -> None:
        if alive:
            self.seen_at[peer] = now
            self.down.discard(peer)
        else:
            self.down.add(peer)

    def forget(self, peer: int) -> None:
        self.seen_at.pop(peer, None)
        self.down.discard(peer)

    def expired(self, peer: int, now: float) -> bool:
        """True if `peer` has just been silent for longer than the timeout (it is now down)."""
        if peer in self.down or now - self.seen_at.get(peer, now) <= self.timeout:
            return False
        self.down.add(peer)
        self.log.warning("peer %d: overlay peer %d is down (silent for %.1fs)", self.me, peer, self.timeout)
        return True
