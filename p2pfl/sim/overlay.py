"""Many peers' HyParView views (`p2pfl.core.membership.views`) on a virtual clock: joins through a
bootstrap peer, graceful leaves, crashes found by a liveness timeout, and attackers that push
their own ids. Every message is msgpack-encoded and decoded on its way and its bytes counted.
A round is one virtual second; `graph()` is the overlay the peers would mix on: the links both
ends hold, among live peers.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

import msgpack

from p2pfl.core.membership.messages import ViewConfig, ViewKind, ViewMsg, decode, encode
from p2pfl.core.membership.views import Out, ViewRefused, Views


class Overlay:
    """`latency`: (min, max) seconds a message travels; `timeout`: seconds before a peer's
    liveness layer reports a dead neighbour, or a message to a dead peer, down; `payload`: bytes of
    each peer's contact payload (an address and a certificate are about 160); `hub`: how many
    times an honest peer's active view an attacker holds (it accepts links up to that many)."""

    def __init__(self, cfg: ViewConfig | None = None, seed: int = 0, latency: tuple[float, float] = (0.005, 0.05),
                 timeout: float = 3.0, payload: int = 160, attackers: Iterable[int] = (), hub: int = 1) -> None:
        self.cfg = cfg or ViewConfig()
        self.seed, self.latency, self.timeout, self.payload = seed, latency, timeout, payload
        self.attackers, self.hub = frozenset(attackers), hub
        self.rng = random.Random(f"overlay/{seed}")
        self.views: dict[int, Views] = {}
        self.live: set[int] = set()
        self.now = 0.0
        self._q: list[tuple[float, int, str, tuple]] = []
        self._seq = 0
        self.bytes = self.messages = 0
        self.refused: Counter[str] = Counter()

    # -- scheduling -------------------------------------------------------------------------------
    def _at(self, t: float, what: str, *args: object) -> None:
        self._seq += 1
        heapq.heappush(self._q, (t, self._seq, what, args))

    def start(self, peer: int, at: float, contact: int | None) -> None:
        """Peer `peer` starts at `at` and joins through `contact` (None: the first peer)."""
        self._at(at, "start", peer, contact)

    def stop(self, peer: int, at: float, crash: bool = False) -> None:
        self._at(at, "stop", peer, crash)

    def run(self, until: float) -> None:
        while self._q and self._q[0][0] <= until:
            t, _, what, args = heapq.heappop(self._q)
            self.now = t
            getattr(self, f"_do_{what}")(*args)
        self.now = until

    # -- events -----------------------------------------------------------------------------------
    def _do_start(self, peer: int, contact: int | None) -> None:
        cfg = self.cfg
        if peer in self.attackers:  # `hub` times the links an honest peer holds
            cfg = replace(cfg, active=self.hub * cfg.active)
        v = self.views[peer] = Views(peer, cfg, self.seed, payload=peer.to_bytes(8, "big") * (self.payload // 8))
        self.live.add(peer)
        if contact is not None:
            self._send(peer, v.join(contact, self.now))
        self._at(self.now + self.rng.random(), "tick", peer)

    def _do_tick(self, peer: int) -> None:
        if peer not in self.live:
            return
        self._send(peer, self.views[peer].tick(self.now))
        if peer in self.attackers:
            self._send(peer, self._push(peer))
        self._at(self.now + 1.0, "tick", peer)

    def _do_stop(self, peer: int, crash: bool) -> None:
        if peer not in self.live:
            return
        v = self.views[peer]
        if crash:
            for q in v.active:  # their heartbeats go unanswered
                self._at(self.now + self.timeout, "down", q, peer)
        else:
            self._send(peer, v.leave(self.now))
        self.live.discard(peer)

    def _do_down(self, holder: int, peer: int) -> None:
        if holder in self.live and peer not in self.live:
            self._send(holder, self.views[holder].down(peer, self.now))

    def _do_deliver(self, src: int, dst: int, frame: bytes) -> None:
        if dst not in self.live:
            self._at(self.now + self.timeout, "down", src, dst)
            return
        msg = decode(msgpack.unpackb(frame), self.views[dst].cfg)
        try:
            self._send(dst, self.views[dst].receive(src, msg, self.now))
        except ViewRefused as e:
            self.refused[e.reason] += 1

    def _send(self, src: int, out: Out) -> None:
        for dst, msg in out:
            if src in self.attackers and msg.entries:
                msg = replace(msg, entries=self._own(src, len(msg.entries)))
            frame = msgpack.packb(encode(msg))
            self.bytes += len(frame)
            self.messages += 1
            if dst not in self.live:
                self._at(self.now + self.timeout, "down", src, dst)
            else:
                self._at(self.now + self.rng.uniform(*self.latency), "deliver", src, dst, frame)

    # -- attackers --------------------------------------------------------------------------------
    def _own(self, me: int, k: int) -> tuple[tuple[int, bytes], ...]:
        """k attacker entries other than `me`, with their payloads."""
        ids = self.rng.sample(sorted(self.attackers - {me}), min(k, len(self.attackers) - 1))
        return tuple((a, a.to_bytes(8, "big") * (self.payload // 8)) for a in ids)

    def _push(self, me: int) -> Out:
        """Each round, to every honest neighbour: a shuffle ending there and a walk end, both
        full of attacker ids; and a high-priority NEIGHBOR to an honest peer it knows."""
        v, cfg = self.views[me], self.cfg
        out: Out = []
        for q in sorted(v.active - self.attackers):
            out.append((q, ViewMsg(ViewKind.SHUFFLE, peer=me, peer_contact=v.payload, ttl=0,
                                   nonce=self.rng.randrange(1 << 62), entries=self._own(me, cfg.max_entries))))
            (a, c), = self._own(me, 1) or ((me, v.payload),)
            out.append((q, ViewMsg(ViewKind.FORWARD_JOIN, peer=a, peer_contact=c, ttl=0)))
        targets = sorted(v.passive - self.attackers - v.active)
        if targets:
            out.append((self.rng.choice(targets), ViewMsg(ViewKind.NEIGHBOR, contact=v.payload, high=True)))
        return out

    # -- what a run reads -------------------------------------------------------------------------
    def graph(self) -> dict[int, set[int]]:
        """Live peers and the links both ends hold."""
        return {p: {q for q in self.views[p].active if q in self.live and p in self.views[q].active}
                for p in sorted(self.live)}
