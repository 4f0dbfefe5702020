"""Admission at the socket, for open networks: which CURVE keys may connect, whose messages are read.

A peer presents its certificate in the CURVE handshake itself: its DEALER sets two ZMQ_METADATA
properties, ``X-Peer`` (the id it claims) and ``X-Cert`` (its certificate, base64), which libzmq
sends inside the encrypted INITIATE command (vouched for by the client's long-term key) and
attaches to every message received on that connection. So the certificate costs no byte per
message and needs no protocol message of its own: a restarted peer presents it on its new
connection, and one this side has forgotten is read again from the next message.

ZAP sees only the client's key (its identity frame is the server's own routing id, not the
client's), so it refuses a key only when the certificate learned for it is revoked; a key with
no certificate learned yet connects on probation, and its first message is read only once the
certificate on its connection verifies for the claimed id and that key. Refused messages are
dropped and counted by reason; a refusal is remembered (bounded), so a connection that keeps
sending costs one signature check, not one per message. A revocation learned later cuts an
admitted key off at its next message and its next handshake.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from p2pfl.core.admission import (
    EXPIRED,
    KEPT,
    MALFORMED,
    MAX_BLOB,
    NO_CERTIFICATE,
    REVOKED,
    WRONG_ID,
    AdmissionError,
    Certificate,
    Revocations,
    verify,
)

log = logging.getLogger("p2pfl.admission")
PEER_PROPERTY, CERT_PROPERTY = "X-Peer", "X-Cert"
LOGGED = 20  # refusals logged one by one; then every 1000th


def handshake_metadata(peer: int, cert: bytes) -> list[bytes]:
    """The ZMQ_METADATA values a DEALER sets (one setsockopt each) to present `cert` as `peer`."""
    return [f"{PEER_PROPERTY}:{peer}".encode(), f"{CERT_PROPERTY}:".encode() + base64.b64encode(cert)]


class Gatekeeper:
    """The certificates, revocations and refusals of one open network, shared by the co-hosted
    peers of a process (one ZAP handler per ZeroMQ context); the ZAP credentials provider.

    At most `capacity` certificates are kept, least recently used first out (a forgotten one is
    presented again with the next message), and `capacity` remembered refusals."""

    def __init__(self, authority_public: bytes, network: str, revocations: Revocations | None = None,
                 capacity: int = KEPT, clock: Callable[[], float] = time.time) -> None:
        self.authority_public, self.network, self.capacity, self.clock = authority_public, network, capacity, clock
        self.revocations = revocations if revocations is not None else Revocations(authority_public, network)
        self.certs: OrderedDict[bytes, Certificate] = OrderedDict()  # by CURVE key (Z85)
        self.refusals: OrderedDict[tuple[bytes, str | None, str | None], str] = OrderedDict()
        self.refused: Counter[str] = Counter()  # messages, by reason
        self.handshakes_refused: Counter[str] = Counter()

    def _keep(self, cert: Certificate) -> None:
        self.certs[cert.key] = cert
        self.certs.move_to_end(cert.key)
        if len(self.certs) > self.capacity:
            self.certs.popitem(last=False)

    def learn(self, cert_blob: bytes, now: float) -> Certificate:
        """Keep a certificate met outside a handshake (a view entry's); `AdmissionError` if it
        admits nobody now."""
        cert = verify(cert_blob, self.authority_public, self.network, now, revoked=self.revocations)
        self._keep(cert)
        return cert

    def revoke(self, blob: bytes, now: float) -> bool:
        """Apply a revocation (`AdmissionError` if it does not verify); True if it is news."""
        return self.revocations.add(blob, now)

    def admits(self, peer_id: int | None, key: bytes, now: float) -> str | None:
        """Why the certificate learned for `key` does not admit `peer_id` now, or None if it does."""
        cert = self.certs.get(key)
        if cert is None:
            return NO_CERTIFICATE
        if now >= cert.expires:
            return EXPIRED
        if self.revocations.revokes(cert.peer, cert.issued):
            return REVOKED
        return None if cert.peer == peer_id else WRONG_ID

    def key_of(self, peer_id: int) -> bytes | None:
        """The CURVE key of the newest certificate learned for `peer_id`."""
        certs = [c for c in self.certs.values() if c.peer == peer_id]
        return max(certs, key=lambda c: c.issued).key if certs else None

    def check(self, claim: str | None, key: bytes, presented: Callable[[], str | None], now: float) -> int | None:
        """The id a message's connection is admitted as (`claim`, its ``X-Peer``), with CURVE `key`,
        or None: refused and counted. `presented` reads the connection's ``X-Cert``, only when no
        certificate learned for the key admits it."""
        peer = int(claim) if claim is not None and claim.isascii() and claim.isdigit() and len(claim) < 19 else None
        reason = self.admits(peer, key, now)
        if reason is None:
            self.certs.move_to_end(key)
            return peer
        text = presented()
        memo = (key, claim if peer is not None else None, text if text is None or len(text) <= 2 * MAX_BLOB else "")
        if memo in self.refusals:
            self.refused[self.refusals[memo]] += 1
            return None
        try:
            cert = verify(self._decode(text), self.authority_public, self.network, now, peer, key, self.revocations)
            if peer is None:
                raise AdmissionError(MALFORMED, f"{PEER_PROPERTY} {claim!r:.40} is not a peer id")
            self._keep(cert)
            return peer
        except AdmissionError as e:
            reason = e.reason
            if self.refused.total() < LOGGED or self.refused.total() % 1000 == 0:
                log.warning("refused messages from peer %.20s (CURVE key %s): %s", claim, key.decode(errors="replace"), e)
        self.refusals[memo] = reason
        if len(self.refusals) > self.capacity:
            self.refusals.popitem(last=False)
        self.refused[reason] += 1
        return None

    @staticmethod
    def _decode(presented: str | None) -> bytes | None:
        if presented is None:
            return None
        if len(presented) > 2 * MAX_BLOB:
            raise AdmissionError(MALFORMED, f"{CERT_PROPERTY} of {len(presented)} characters")
        try:
            return base64.b64decode(presented, validate=True)
        except binascii.Error:
            raise AdmissionError(MALFORMED, f"{CERT_PROPERTY} is not base64") from None

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: refuse a key whose learned certificate is revoked (re-admission takes a new key);
        accept the others, unknown keys on probation (`check`). An expired certificate is
        forgotten: the connection may carry its renewal, for the same key."""
        reason = self.admits(None, key, self.clock())
        if reason == EXPIRED:
            del self.certs[key]
        elif reason == REVOKED:
            self.handshakes_refused[reason] += 1
            log.warning("refused a CURVE handshake from key %s: its certificate is revoked", key.decode(errors="replace"))
            return False
        return True
