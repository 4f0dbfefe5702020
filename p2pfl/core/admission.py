"""Admission to an open network: certificates, revocations and the network id.

An authority's Ed25519 key (PyNaCl) signs certificates, each binding a peer id to its CurveZMQ
public key in one network until an expiry, and revocations of a peer id. Both are msgpack arrays
in a fixed field order, canonical (a blob that msgpack would encode differently is refused), so a
certificate is one byte string that rides on handshakes and view messages unchanged. Pure: time is
an input, and nothing here draws randomness (Ed25519 signing is deterministic); key pairs are made
by `p2pfl.ops.authority`. Importing PyNaCl loads libsodium, whose one-time initialisation seeds its
random generator from the kernel; verification itself is a computation on its inputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from p2pfl.errors import P2pflError

NO_CERTIFICATE, MALFORMED, EXPIRED, REVOKED = "no-certificate", "malformed", "expired", "revoked"
WRONG_ID, WRONG_KEY, BAD_SIGNATURE = "wrong-id", "wrong-key", "bad-signature"
OTHER_AUTHORITY, OTHER_NETWORK = "other-authority", "other-network"
REASONS = (NO_CERTIFICATE, MALFORMED, EXPIRED, REVOKED, WRONG_ID, WRONG_KEY, BAD_SIGNATURE, OTHER_AUTHORITY, OTHER_NETWORK)

CERTIFICATE, REVOCATION = 1, 2  # each blob's first field: a signature over one kind never verifies as the other
MAX_BLOB = 512  # a certificate is 132 bytes plus the network name's length for ids below 128 (docs/security.md)
MAX_NAME = 64  # characters of a network name
MAX_VALIDITY = 366 * 86400  # the longest certificate the authority issues, in seconds; bounds a revocation's life
KEY_ID_BYTES = 8
KEPT = 1024  # revocations a peer keeps; also the gatekeeper's learned certificates and remembered refusals
Z85_KEY = 40  # characters of a CurveZMQ public key
SIGNATURE = 64
# Field types after the kind; the peer id and times are non-negative msgpack ints.
_CERT_FIELDS = (bytes, str, int, bytes, int, int)  # authority key id, network, peer, CURVE key (Z85), issued, expires
_REVOCATION_FIELDS = (bytes, str, int, int, int)  # authority key id, network, peer, issued, until


class AdmissionError(P2pflError, ValueError):
    """A certificate or revocation that admits nothing; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Certificate:
    peer: int
    key: bytes  # the peer's CurveZMQ public key, Z85
    network: str
    issued: int  # unix seconds
    expires: int  # unix seconds: valid while now < expires
    authority: bytes  # the signing key's id (`key_id`)
    blob: bytes  # the signed encoding, as it travels


@dataclass(frozen=True)
class Revocation:
    peer: int
    issued: int  # revokes every certificate of `peer` issued at or before this time
    until: int  # no certificate it revokes is valid after this: then it can be forgotten
    network: str
    authority: bytes
    blob: bytes


def key_id(authority_public: bytes) -> bytes:
    """The 8 bytes a certificate names its authority by: BLAKE2b-64 of the Ed25519 public key."""
    return hashlib.blake2b(authority_public, digest_size=KEY_ID_BYTES).digest()


def network_id(name: str, authority_public: bytes) -> int:
    """An open network's `net` (docs/wire.md section 4): a 63-bit digest of its name and authority
    key, in the style of `Topology.network_id`, so peers of two networks never mix."""
    text = json.dumps({"authority": authority_public.hex(), "name": name}, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def public_key(authority_secret: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte secret seed."""
    return bytes(SigningKey(authority_secret).verify_key)


def _signed(authority_secret: bytes, body: list) -> bytes:
    signature = SigningKey(authority_secret).sign(msgpack.packb(body)).signature
    return msgpack.packb([*body, signature])


def issue(authority_secret: bytes, network: str, peer: int, key: bytes, issued: int, expires: int) -> bytes:
    """A certificate for `peer` holding CurveZMQ public `key` (Z85) from `issued` until `expires`."""
    if len(key) != Z85_KEY or not key.isascii():
        raise AdmissionError(MALFORMED, f"a CurveZMQ public key is {Z85_KEY} Z85 characters, got {key!r}")
    if not 0 < expires - issued <= MAX_VALIDITY:
        raise AdmissionError(MALFORMED, f"validity must be positive and at most {MAX_VALIDITY // 86400} days")
    return _signed(authority_secret, [CERTIFICATE, key_id(public_key(authority_secret)), network, peer, key, issued, expires])


def revoke(authority_secret: bytes, network: str, peer: int, issued: int, until: int) -> bytes:
    """A revocation of every certificate of `peer` issued up to `issued`; `until`: the latest
    expiry among them (at most `issued + MAX_VALIDITY`)."""
    return _signed(authority_secret, [REVOCATION, key_id(public_key(authority_secret)), network, peer, issued, until])


def _open(blob: object, kind: int, types: tuple[type, ...], authority_public: bytes, network: str) -> list:
    """The fields of a signed blob of `kind` after the kind, checked in the order of the reasons:
    shape, authority, signature, network."""
    what = "certificate" if kind == CERTIFICATE else "revocation"
    if not blob:
        raise AdmissionError(NO_CERTIFICATE if kind == CERTIFICATE else MALFORMED, f"no {what}")
    if not isinstance(blob, bytes) or len(blob) > MAX_BLOB:
        raise AdmissionError(MALFORMED, f"a {what} is bytes of at most {MAX_BLOB}")
    try:
        fields = msgpack.unpackb(blob, max_array_len=16, max_map_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise AdmissionError(MALFORMED, f"{what} is not msgpack: {e}") from None
    if not (isinstance(fields, list) and len(fields) == len(types) + 2 and fields[0] == kind
            and all(type(v) is t for v, t in zip(fields[1:], types, strict=False)) and type(fields[-1]) is bytes):
        raise AdmissionError(MALFORMED, f"not a {what}: expected [kind {kind}, {', '.join(t.__name__ for t in types)}, signature]")
    if msgpack.packb(fields) != blob:
        raise AdmissionError(MALFORMED, f"{what} is not canonically encoded")
    if any(type(v) is int and v < 0 for v in fields[1:]) or len(fields[1]) != KEY_ID_BYTES or len(fields[-1]) != SIGNATURE:
        raise AdmissionError(MALFORMED, f"{what}: a negative number, or a key id or signature of the wrong size")
    if fields[1] != key_id(authority_public):
        raise AdmissionError(OTHER_AUTHORITY, f"{what} signed by authority {fields[1].hex()}, not {key_id(authority_public).hex()}")
    try:
        VerifyKey(authority_public).verify(msgpack.packb(fields[:-1]), fields[-1])
    except BadSignatureError:
        raise AdmissionError(BAD_SIGNATURE, f"{what} signature does not verify") from None
    if fields[2] != network:
        raise AdmissionError(OTHER_NETWORK, f"{what} is for network {fields[2]!r}, not {network!r}")
    return fields[1:-1]


def verify(cert: bytes | None, authority_public: bytes, network: str, now: float, claimed_id: int | None = None,
           claimed_key: bytes | None = None, revoked: Revocations | None = None) -> Certificate:
    """The certificate `cert` if it admits `claimed_id` with `claimed_key` (None: not checked, as
    for a certificate learned from a view entry) at time `now`; else `AdmissionError`."""
    authority, name, peer, key, issued, expires = _open(cert, CERTIFICATE, _CERT_FIELDS, authority_public, network)
    c = Certificate(peer, key, name, issued, expires, authority, cert)  # type: ignore[arg-type]  # _open checked the types
    if claimed_id is not None and peer != claimed_id:
        raise AdmissionError(WRONG_ID, f"certificate of peer {peer} presented by peer {claimed_id}")
    if claimed_key is not None and key != claimed_key:
        raise AdmissionError(WRONG_KEY, f"certificate of peer {peer} is for another CurveZMQ key")
    if now >= expires:
        raise AdmissionError(EXPIRED, f"certificate of peer {peer} expired at {expires} (now {now:.0f})")
    if revoked is not None and revoked.revokes(peer, issued):
        raise AdmissionError(REVOKED, f"certificate of peer {peer} issued at {issued} is revoked")
    return c


def verify_revocation(blob: bytes, authority_public: bytes, network: str) -> Revocation:
    authority, name, peer, issued, until = _open(blob, REVOCATION, _REVOCATION_FIELDS, authority_public, network)
    return Revocation(peer, issued, until, name, authority, blob)


class Revocations:
    """The revocations a peer knows, merged from gossip; bounded.

    One per peer id: the newest covers every older one. One is forgotten once every certificate it
    revokes has expired (`until`). At most `capacity` are kept: when full, a new one replaces the
    one that expires first if it expires later itself, and is refused otherwise (`dropped` counts
    both), so what is lost is always what would be moot soonest."""

    def __init__(self, authority_public: bytes, network: str, capacity: int = KEPT) -> None:
        self.authority_public, self.network, self.capacity = authority_public, network, capacity
        self.by_peer: dict[int, Revocation] = {}
        self.dropped = 0

    def add(self, blob: bytes, now: float) -> bool:
        """Take a revocation (`AdmissionError` if it does not verify); True if it is news."""
        r = verify_revocation(blob, self.authority_public, self.network)
        old = self.by_peer.get(r.peer)
        if r.until <= now or (old is not None and old.issued >= r.issued):
            return False
        for p in [p for p, k in self.by_peer.items() if k.until <= now]:
            del self.by_peer[p]
        if r.peer not in self.by_peer and len(self.by_peer) >= self.capacity:
            first = min(self.by_peer.values(), key=lambda k: (k.until, k.peer))
            self.dropped += 1
            if first.until >= r.until:
                return False
            del self.by_peer[first.peer]
        self.by_peer[r.peer] = r
        return True

    def revokes(self, peer: int, issued: int) -> bool:
        r = self.by_peer.get(peer)
        return r is not None and issued <= r.issued

    def blobs(self) -> list[bytes]:
        """Every revocation kept, by peer id, to pass on."""
        return [self.by_peer[p].blob for p in sorted(self.by_peer)]

    def __len__(self) -> int:
        return len(self.by_peer)
