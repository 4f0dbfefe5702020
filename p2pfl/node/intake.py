"""What a peer takes in from the network, and what it refuses: decoding, identity and network
checks, refusals counted by reason, strikes against neighbours that keep earning them
(`core.conduct`), and internal errors.

Every refusal is counted and logged (the first few of a kind, then every 1000th: hostile input
must not flood the log); a refusal from a known sender is also a strike, and enough strikes
mark it misbehaving for a cool-off. Pure: time is an argument.
"""

from __future__ import annotations

import logging
from typing import Any

from p2pfl.core.conduct import Conduct, Limits, check_claim
from p2pfl.core.wire import Message, WireError, decode


class LogLimiter:
    """Log the first few of a kind of event, then every 1000th."""

    def __init__(self, first: int = 20, every: int = 1000) -> None:
        self.first, self.every, self.count = first, every, 0

    def __call__(self) -> bool:
        self.count += 1
        return self.count <= self.first or self.count % self.every == 0


class Intake:
    def __init__(self, me: int, net: int, secure: bool, max_frame: int, limits: Limits, log: logging.Logger) -> None:
        """`net`: this network's id, which every accepted message must carry; `secure`: identities
        are CURVE keys (else routing ids or in-process senders)."""
        self.me, self.net, self.secure, self.max_frame, self.log = me, net, secure, max_frame, log
        self.conduct = Conduct(limits)
        self.rejected = 0
        self.by_reason: dict[str, int] = {}
        self._log_reject = LogLimiter()
        self.internal_errors = 0
        self._log_internal: set[tuple[str, str]] = set()

    def decode(self, frames: list[Any], vouched: int | None) -> Message | None:
        """The message, or None (refused and counted) if it is not one, is not from whom the
        channel vouches for (`vouched`: CURVE key, routing id or co-hosted sender), or belongs to
        another network."""
        try:
            # Values are checked where they are read: codecs refuse non-finite output before
            # anything reaches a replica, the piggybacked blocks check their float64 rows.
            msg = decode(frames, self.max_frame, check_finite=False)
        except WireError as e:
            self.reject("wire", str(e))
            return None
        if vouched != msg.sender:
            what = f"CURVE key of peer {vouched}" if self.secure else f"routing id {vouched}"
            self.reject("identity", f"{what} sent a message claiming to be peer {msg.sender}")
            return None
        if msg.net != self.net:  # not a strike: the sender's id is another network's
            self.reject("network", f"a message from peer {msg.sender} of network {msg.net:016x}; this peer's is {self.net:016x} "
                                   "(a stale run on a reused port, or a peer started with another topology file)")
            return None
        return msg

    def reject(self, reason: str, detail: str, sender: int | None = None, now: float = 0.0, strike: bool = True) -> bool:
        """Count a refusal by reason; from a known sender it is also a strike. True when that strike
        marks the sender misbehaving (its weight must move to self)."""
        self.rejected += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if self._log_reject():
            self.log.warning("peer %d: rejected message (%s): %s [total %d]", self.me, reason, detail, self.rejected)
        if strike and sender is not None and self.conduct.strike(sender, now):
            self.log.warning("peer %d: neighbour %d is misbehaving (%d refusals, the last: %s: %s); ignoring it for %.0fs, "
                             "its weight moves to self", self.me, sender, self.conduct.limits.strikes, reason, detail,
                             self.conduct.limits.cooloff)
            return True
        return False

    def lie(self, msg: Message, own: int, rounds: dict[int, int]) -> str | None:
        """Why the round `msg` claims is not believable, or None (`core.conduct.check_claim`)."""
        return check_claim(msg.sender, msg.round, own, rounds, self.conduct.limits)

    def banned(self, peer: int) -> bool:
        return self.conduct.banned(peer)

    def internal_error(self, where: str, e: BaseException) -> None:
        """Count an unexpected exception; its traceback is logged once per place and type."""
        self.internal_errors += 1
        key = (where.split(" from ")[0], type(e).__name__)
        if key not in self._log_internal:
            self._log_internal.add(key)
            self.log.error("peer %d: internal error %s: %s: %s [counted as internal_errors]", self.me, where, type(e).__name__, e,
                           exc_info=e)
