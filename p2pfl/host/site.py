"""One process's peers of an open network: the network file, each peer's certificate, key pair
and listen address, and the process's gatekeeper (admission at the socket, `net.gatekeeper`).

A site starts with its network file (name, authority key, bootstrap peers, settings), a file of
one or more certificates (one peer each, from `p2pfl-topology authority admit`), their CurveZMQ
secret keys, and where to listen; co-hosted peers listen on consecutive ports. It learns every
other peer from the view protocol (`Views.contact`: address and certificate), and dials a peer
only with the key its certificate names, verified here before use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.core.admission import AdmissionError, Certificate, Revocations, verify
from p2pfl.core.membership.contact import Contact, decode_contact, encode_contact
from p2pfl.core.membership.messages import ViewConfig, ViewWireError
from p2pfl.core.netfile import Network
from p2pfl.core.topology import PeerSpec
from p2pfl.host.files import load_blobs, load_network
from p2pfl.net.gatekeeper import Gatekeeper
from p2pfl.net.transport import CurveKeys, admitted_keys
from p2pfl.node.build import make_open_node
from p2pfl.node.node import Node, NodeSpec

log = logging.getLogger("p2pfl.site")


@dataclass
class SitePeer:
    id: int
    host: str
    port: int
    keys: CurveKeys
    cert: Certificate
    payload: bytes  # its contact in view entries

    @property
    def spec(self) -> PeerSpec:
        return PeerSpec(self.id, self.host, self.port)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"--listen: expected HOST:PORT (the address other peers dial), got {text!r}")
    return host, int(port)


class OpenSite:
    def __init__(self, network_path: Path, cert_path: Path, listen: str, secret_key: Path | None = None,
                 revocations: Path | None = None) -> None:
        """`cert_path`: one certificate a line, one peer each; `secret_key`: with one certificate,
        its key pair's secret file (default for each: keys/peer-<id>.key_secret beside the
        certificate file, where `authority admit` writes it); `revocations`: a revocation file,
        read at start and again whenever it changes (`refresh`)."""
        self.path = network_path
        self.network: Network = load_network(network_path)
        self.views = self.network.views or ViewConfig()
        self.gate = Gatekeeper(self.network.authority, self.network.name)
        self.revocations_path = revocations
        self._seen: tuple[float, int] | None = None
        self.refresh()
        host, port = parse_listen(listen)
        blobs = load_blobs(cert_path)
        if not blobs:
            raise ConfigError(f"--cert: {cert_path} holds no certificate")
        if secret_key is not None and len(blobs) > 1:
            raise ConfigError(f"--secret-key: {cert_path} holds {len(blobs)} certificates; keep their keys as keys/peer-<id>.key_secret beside it")
        now = time.time()
        self.peers: dict[int, SitePeer] = {}
        for k, blob in enumerate(blobs):
            try:
                peer = verify(blob, self.network.authority, self.network.name, now, revoked=self.gate.revocations).peer
                key = secret_key or cert_path.parent / "keys" / f"peer-{peer}.key_secret"
                pid, keys = admitted_keys(blob, key, self.gate, now)
            except AdmissionError as e:
                raise ConfigError(f"--cert: {cert_path} line {k + 1}: {e}") from None
            if pid in self.peers:
                raise ConfigError(f"--cert: {cert_path} holds two certificates for peer {pid}")
            cert = self.gate.learn(blob, now)
            payload = encode_contact(Contact(host, port + k, blob))
            if len(payload) > self.views.max_payload:
                raise ConfigError(f"--listen/--cert: peer {pid}'s contact is {len(payload)} bytes, over max_payload {self.views.max_payload}")
            self.peers[pid] = SitePeer(pid, host, port + k, keys, cert, payload)
        self.bootstrap = {b.id: b for b in self.network.bootstrap}

    @property
    def ids(self) -> list[int]:
        return sorted(self.peers)

    def contact_of(self, peer: int) -> int | None:
        """The peer `peer` joins through: the first bootstrap entry that is another peer (None:
        it is the network's only bootstrap peer, and waits to be joined)."""
        return next((b.id for b in self.network.bootstrap if b.id != peer), None)

    def node(self, cfg: PeerConfig, spec: NodeSpec, log: logging.Logger) -> Node:
        """Peer `cfg.id`'s node: its own revocation set (news decides what it passes on) beside the
        gatekeeper's, which the node also adds to. `wall`: unix time minus the loop's monotonic clock."""
        own = Revocations(self.network.authority, self.network.name)
        for blob in self.gate.revocations.blobs():
            own.add(blob, time.time())
        return make_open_node(cfg, self.contact_of(cfg.id), spec, self.network.id, self.views, self.peers[cfg.id].payload, log=log,
                              revocations=own, wall=time.time() - time.monotonic(), shared=self.gate.revocations)

    def address(self, peer: int, payload: bytes | None) -> PeerSpec | None:
        """Where to dial `peer` and the CURVE key to expect: from its contact payload (the
        certificate verified now), else its bootstrap entry; None (logged) if neither admits it."""
        if payload:
            try:
                c = decode_contact(payload)
                cert = self.gate.learn(c.cert, time.time())
            except (ViewWireError, AdmissionError) as e:
                log.warning("no address for peer %d: its contact does not admit it: %s", peer, e)
                return None
            if cert.peer == peer:
                return PeerSpec(peer, c.host, c.port, {"public_key": cert.key.decode()})
            log.warning("no address for peer %d: its contact holds the certificate of peer %d", peer, cert.peer)
        b = self.bootstrap.get(peer)
        return PeerSpec(peer, b.host, b.port, {"public_key": b.public_key}) if b is not None else None

    def revoked(self, peer: int) -> bool:
        """Whether a revocation known here covers this process's own peer `peer`'s certificate."""
        c = self.peers[peer].cert
        return self.gate.revocations.revokes(c.peer, c.issued)

    def refresh(self) -> None:
        """Give the gatekeeper the revocation file's revocations, if it changed since last read."""
        p = self.revocations_path
        if p is None:
            return
        try:
            st = p.stat()
        except FileNotFoundError:
            return
        if self._seen == (st.st_mtime, st.st_size):
            return
        self._seen = (st.st_mtime, st.st_size)
        blobs = load_blobs(p, "revocation")
        for blob in blobs:
            try:
                self.gate.revoke(blob, time.time())
            except AdmissionError as e:
                log.error("%s: a revocation that does not verify: %s", p, e)
