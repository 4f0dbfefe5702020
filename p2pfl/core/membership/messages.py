"""The view protocol's settings and messages: what a HyParView message may hold, its msgpack-able
encoding, and a decoder that refuses anything malformed or over the bounds before it is used.

Every bound comes from `ViewConfig`, which peers of one network share: a message holds at most
`ka + kp` entries, each an id (0 <= id < 2^63) and an opaque contact payload (address and
admission certificate, at most `max_payload` bytes), so one encoded message is at most
`ViewConfig.max_message_bytes`; the host refuses a larger frame before it unpacks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from p2pfl.config import ConfigError
from p2pfl.core.wire import WireError

MAX_ID = 1 << 63  # ids and nonces are non-negative 63-bit ints (msgpack ints, like the wire's)
Entry = tuple[int, bytes]  # (peer id, its contact payload)


class ViewWireError(WireError):
    """A view message that is malformed or over a bound; the message names the field."""


@dataclass(frozen=True)
class ViewConfig:
    """HyParView's parameters (Leitão et al. 2007 use active 5, passive 30, ARWL 6, PRWL 3 at
    n = 10^4). n is unknown to a peer, so the active size is fixed, not log2(n) + 1."""

    active: int = 5  # active view: the symmetric neighbours a peer mixes with
    passive: int = 30  # passive view: candidates that replace failed neighbours
    arwl: int = 6  # active random walk length of a FORWARD_JOIN
    prwl: int = 3  # the walk's hop count at which the joiner also enters a passive view
    shuffle_ttl: int = 3  # hops of a SHUFFLE's random walk
    shuffle_period: float = 10.0  # seconds between a peer's shuffles (their bytes: docs/membership.md)
    ka: int = 3  # active entries a shuffle carries
    kp: int = 4  # passive entries a shuffle carries
    max_payload: int = 512  # bytes of one entry's contact payload (address + certificate)
    rate: float = 20.0  # view messages per second one sender may send (token bucket refill)
    burst: int = 100  # ... and its bucket
    request_timeout: float = 5.0  # a JOIN, NEIGHBOR or SHUFFLE unanswered this long is given up
    tracked: int = 64  # senders whose rate buckets are kept (the rest share one bucket)
    recent: int = 16  # contacts kept for addressees outside both views (a shuffle's origin)
    rewires: int = 4  # switches a new peer makes, one per request_timeout at most (views.Views._rewire)

    def __post_init__(self) -> None:
        at_least = {"active": 1, "passive": 1, "arwl": 1, "prwl": 0, "shuffle_ttl": 0, "ka": 0, "kp": 0,
                    "max_payload": 0, "burst": 1, "tracked": 1, "recent": 1, "rewires": 0}
        for name, low in at_least.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"ViewConfig.{name}: need an int >= {low}, got {v!r}")
        for name in ("shuffle_period", "rate", "request_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"ViewConfig.{name}: need a finite number > 0, got {v!r}")
        if self.prwl > self.arwl or self.shuffle_ttl > self.arwl:
            raise ConfigError(f"ViewConfig: prwl ({self.prwl}) and shuffle_ttl ({self.shuffle_ttl}) "
                              f"must be at most arwl ({self.arwl})")
        if self.ka + self.kp < 1 or self.ka > self.active or self.kp > self.passive:
            raise ConfigError(f"ViewConfig: need 1 <= ka + kp, ka <= active, kp <= passive; "
                              f"got ka={self.ka} kp={self.kp} active={self.active} passive={self.passive}")
        if self.max_payload > 0xFFFF:
            raise ConfigError(f"ViewConfig.max_payload: at most 65535 bytes, got {self.max_payload}")

    @classmethod
    def from_dict(cls, d: Any, where: str = "membership") -> ViewConfig:
        """From a settings mapping; a misspelt key is refused with its name."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: need a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        return cls(**d)

    @property
    def max_entries(self) -> int:
        return self.ka + self.kp

    @property
    def max_ttl(self) -> int:
        return self.arwl

    @property
    def max_message_bytes(self) -> int:
        """An upper bound of one encoded message's msgpack size: keys and scalars, one payload
        of the sender or origin, and the entries (a SHUFFLE or NEIGHBOR_REPLY at every bound)."""
        blob = 3 + self.max_payload  # bin 16 header + data
        return 64 + blob + self.max_entries * (1 + 9 + blob)

    @property
    def state_bytes(self) -> int:
        """An upper bound of the protocol data one peer holds, whatever the network's size: ids and
        payloads of both views and the recent contacts, the rate buckets (id and three floats), the
        pending requests (id, deadline, flags), the ids asked since the last tick, the open
        shuffle (nonce, deadline) and the join walks' bucket (two floats)."""
        entry = 8 + self.max_payload
        return (self.active + self.passive + self.recent) * entry + (self.tracked + 1) * 32 \
            + (self.active + 1) * 24 + 2 * self.active * 8 + 32


class ViewKind(StrEnum):
    JOIN = "join"  # a joiner asks its contact to take it in
    FORWARD_JOIN = "forward_join"  # the contact's random walk announcing the joiner
    NEIGHBOR = "neighbor"  # ask for an active link (high priority: my active view is empty)
    NEIGHBOR_REPLY = "neighbor_reply"  # accept or reject; a JOIN's reply carries a sample of views
    DISCONNECT = "disconnect"  # the link is gone (leaving: the sender leaves the network)
    SHUFFLE = "shuffle"  # a random walk carrying a sample of the origin's views
    SHUFFLE_REPLY = "shuffle_reply"  # the walk's end answers the origin with a sample of its own
    REVOKE = "revoke"  # the authority's revocations, flooded on the active view (node.membership.Open)


@dataclass(frozen=True)
class ViewMsg:
    kind: ViewKind
    contact: bytes = b""  # the sender's own payload
    peer: int = 0  # FORWARD_JOIN: the joiner; SHUFFLE: the origin
    peer_contact: bytes = b""  # ... and its payload
    ttl: int = 0
    high: bool = False
    accept: bool = False
    leaving: bool = False
    nonce: int = 0
    entries: tuple[Entry, ...] = ()
    revocations: tuple[bytes, ...] = ()


# Which fields each kind carries, and their keys on the wire.
FIELDS: dict[ViewKind, tuple[str, ...]] = {
    ViewKind.JOIN: ("contact",),
    ViewKind.FORWARD_JOIN: ("peer", "peer_contact", "ttl"),
    ViewKind.NEIGHBOR: ("contact", "high"),
    ViewKind.NEIGHBOR_REPLY: ("contact", "accept", "entries"),
    ViewKind.DISCONNECT: ("leaving",),
    ViewKind.SHUFFLE: ("peer", "peer_contact", "ttl", "nonce", "entries"),
    ViewKind.SHUFFLE_REPLY: ("nonce", "entries"),
    ViewKind.REVOKE: ("revocations",),
}
KEYS = {"contact": "c", "peer": "p", "peer_contact": "pc", "ttl": "t", "high": "h", "accept": "a",
        "leaving": "l", "nonce": "n", "entries": "e", "revocations": "r"}


def encode(msg: ViewMsg) -> dict[str, Any]:
    """A msgpack-able map: ``k`` the kind, then the kind's fields only (`FIELDS`, `KEYS`)."""
    out: dict[str, Any] = {"k": msg.kind.value}
    for f in FIELDS[msg.kind]:
        v = getattr(msg, f)
        out[KEYS[f]] = [[p, c] for p, c in v] if f == "entries" else list(v) if f == "revocations" else v
    return out


def _id(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_ID:
        raise ViewWireError(f"view message: {where} must be an int in [0, 2^63), got {v!r}"[:200])
    return v


def _blob(v: Any, where: str, cfg: ViewConfig) -> bytes:
    if not isinstance(v, bytes | bytearray):
        raise ViewWireError(f"view message: {where} must be bytes, got {type(v).__name__}")
    if len(v) > cfg.max_payload:
        raise ViewWireError(f"view message: {where} is {len(v)} bytes, over max_payload {cfg.max_payload}")
    return bytes(v)


def _field(name: str, v: Any, cfg: ViewConfig) -> Any:
    key = KEYS[name]
    if name in ("contact", "peer_contact"):
        return _blob(v, f"field {key!r}", cfg)
    if name in ("peer", "nonce"):
        return _id(v, f"field {key!r}")
    if name == "ttl":
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= cfg.max_ttl:
            raise ViewWireError(f"view message: field 't' must be an int in [0, {cfg.max_ttl}], got {v!r}"[:200])
        return v
    if name in ("high", "accept", "leaving"):
        if not isinstance(v, bool):
            raise ViewWireError(f"view message: field {key!r} must be a bool, got {type(v).__name__}")
        return v
    if name == "revocations":
        if not isinstance(v, list | tuple) or not 0 < len(v) <= cfg.max_entries:
            raise ViewWireError(f"view message: field 'r' must be a list of 1 to ka + kp = {cfg.max_entries} revocations")
        return tuple(_blob(b, f"field 'r'[{i}]", cfg) for i, b in enumerate(v))
    if not isinstance(v, list | tuple):
        raise ViewWireError(f"view message: field 'e' must be a list, got {type(v).__name__}")
    if len(v) > cfg.max_entries:
        raise ViewWireError(f"view message: field 'e' has {len(v)} entries, over ka + kp = {cfg.max_entries}")
    entries: list[Entry] = []
    for i, e in enumerate(v):
        if not isinstance(e, list | tuple) or len(e) != 2:
            raise ViewWireError(f"view message: field 'e'[{i}] must be a pair [id, payload]")
        entries.append((_id(e[0], f"field 'e'[{i}] id"), _blob(e[1], f"field 'e'[{i}] payload", cfg)))
    if len({p for p, _ in entries}) != len(entries):
        raise ViewWireError("view message: field 'e' names a peer twice")
    return tuple(entries)


def decode(obj: Any, cfg: ViewConfig) -> ViewMsg:
    """The message an unpacked map holds, or `ViewWireError` naming the first bad field."""
    if not isinstance(obj, dict):
        raise ViewWireError(f"view message: need a map, got {type(obj).__name__}")
    try:
        kind = ViewKind(obj.get("k"))
    except ValueError:
        raise ViewWireError(f"view message: field 'k' is not a view kind: {obj.get('k')!r}"[:200]) from None
    names = FIELDS[kind]
    want = {"k", *(KEYS[f] for f in names)}
    if set(obj) != want:
        extra, missing = set(obj) - want, want - set(obj)
        raise ViewWireError(f"view message {kind.value}: unknown fields {sorted(map(repr, extra))[:4]}, "
                            f"missing {sorted(missing)}")
    return ViewMsg(kind, **{f: _field(f, obj[KEYS[f]], cfg) for f in names})
