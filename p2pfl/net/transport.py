"""Asyncio ZeroMQ transport: one ROUTER bound per peer, one DEALER per neighbour.

It moves frame lists and nothing else: no protocol logic lives here.  Sends never block the
event loop: each neighbour has a bounded queue drained by its own task, DEALERs use
ZMQ_IMMEDIATE (nothing queues for a peer that is not connected) and a send high-water mark; a
full queue drops the message and counts it (CHOCO's sequence numbers turn that into a resync).
When a neighbour goes down, `flush` drops what waits for it, in the queue and at the socket, and
pings go out with `offer` (now or never): otherwise its next incarnation would first receive
seconds-old messages, with old round numbers, when the DEALER reconnects. A link that is merely
no longer needed (`disconnect`) closes only once what waits on it has left: a schedule's delta
queued for a peer that is still starting is the one message that peer's round waits for.
The ROUTER's routing id is the sender's DEALER identity, which the peer checks against the
header's sender field.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from p2pfl.config import PeerConfig
from p2pfl.core.admission import verify
from p2pfl.core.topology import PeerSpec, Topology, TopologyError
from p2pfl.core.wire import frames_nbytes
from p2pfl.net.gatekeeper import CERT_PROPERTY, PEER_PROPERTY, Gatekeeper, handshake_metadata

log = logging.getLogger("p2pfl.transport")
RETIRE_LINGER_MS = 2000  # a retired DEALER's last accepted messages; bounds how long closing the context can wait


@dataclass
class CurveKeys:
    """CurveZMQ keys (Z85 bytes): ours, and every peer's public key from the topology file; in an
    open network (no peer list) our admission certificate instead."""

    public: bytes
    secret: bytes
    peers: dict[int, bytes] = field(default_factory=dict)
    cert: bytes | None = None

    def peer_of(self, public: bytes) -> int | None:
        for p, k in self.peers.items():
            if k == public:
                return p
        return None


def curve_keys(topo: Topology, me: int, topology_path: Path, secret_key: Path | None) -> CurveKeys | None:
    """Secure mode is on exactly when the topology lists public keys; then every peer needs one."""
    listed = {p: spec.extra.get("public_key") for p, spec in topo.peers.items()}
    if not any(listed.values()):
        return None
    missing = sorted(p for p, k in listed.items() if not k)
    if missing:
        raise TopologyError(f"{topology_path}: peers {missing} have no public_key while others do; list one for every peer")
    for p, k in listed.items():
        if not isinstance(k, str) or len(k) != 40:
            raise TopologyError(f"{topology_path}: peer {p} public_key must be a 40-character Z85 string")
    path = secret_key or Path(topology_path).parent / "keys" / f"peer-{me}.key_secret"
    public, secret = _key_pair(path)
    if public.decode() != listed[me]:
        raise TopologyError(f"--secret-key: {path} does not match peer {me}'s public_key in {topology_path}")
    return CurveKeys(public=public, secret=secret, peers={p: str(k).encode() for p, k in listed.items()})


def _key_pair(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise TopologyError(f"--secret-key: cannot load CurveZMQ secret key {path}: {e}") from e
    if secret is None:
        raise TopologyError(f"--secret-key: {path} holds no secret key")
    return public, secret


def admitted_keys(cert: bytes, secret_key: Path, gate: Gatekeeper, now: float) -> tuple[int, CurveKeys]:
    """Our id and keys in an open network: the id our certificate (`p2pfl.host.files.load_blobs`
    reads its file) admits now with the key pair in `secret_key`; `AdmissionError` otherwise."""
    public, secret = _key_pair(secret_key)
    own = verify(cert, gate.authority_public, gate.network, now, claimed_key=public, revoked=gate.revocations)
    return own.peer, CurveKeys(public=public, secret=secret, cert=cert)


def dial_endpoint(me: int, spec: PeerSpec) -> str:
    """Where peer `me` dials `spec`: its address, or the one its topology entry names for `me`
    under `via` (a fault-injecting proxy in between: `p2pfl.net.proxy.route`)."""
    via = spec.extra.get("via", {})
    if not isinstance(via, dict):
        raise TopologyError(f"peer {spec.id}: 'via' must map peer ids to 'host:port', got {via!r}")
    if me not in via:
        return spec.endpoint
    host, sep, port = str(via[me]).rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise TopologyError(f"peer {spec.id}: via[{me}] must be 'host:port', got {via[me]!r}")
    return f"tcp://{host}:{port}"


class _KnownKeys:
    """ZAP credentials provider: a connection is accepted only with a key listed in the topology."""

    def __init__(self, keys: CurveKeys) -> None:
        self.allowed = set(keys.peers.values())
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allowed  # pyzmq hands us the client's key in Z85
        if not ok:
            self.refused += 1
            log.warning("refused a CURVE handshake from an unknown key")
        return ok


class SharedContext:
    """One ZeroMQ context (and, with CURVE, one ZAP handler) for the transports of co-hosted peers."""

    def __init__(self, curve: CurveKeys | None, gate: Gatekeeper | None = None) -> None:
        """`gate`: an open network's admission, shared by the co-hosted peers like the context."""
        self.ctx = zmq.asyncio.Context()
        self.auth: AsyncioAuthenticator | None = None
        if curve is not None:  # every peer of a topology (or of an open network) accepts the same keys
            self.auth = AsyncioAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback(domain="*", credentials_provider=gate or _KnownKeys(curve))

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _property(frame: zmq.Frame, name: str) -> str | None:
    """A received message's connection property (ZAP User-Id, handshake metadata), None if absent."""
    try:
        return frame.get(name)
    except zmq.ZMQError:
        return None


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    dropped: int = 0


class Transport:
    """Sockets are plain (blocking-API) ZeroMQ sockets used only with ``NOBLOCK``; the event loop
    watches each socket's ``ZMQ_FD`` and wakes the one task waiting on it. pyzmq's asyncio sockets
    do the same behind a future per call, a timeout lookup and a list of pending events, which
    cost more CPU per message than our decoding does (`bench/gossip_throughput.py`; figures in
    docs/benchmarks.md)."""

    def __init__(
        self,
        me: PeerSpec,
        neighbors: dict[int, PeerSpec],
        max_frame: int,
        queue_size: int = 64,
        hwm: int = 64,
        curve: CurveKeys | None = None,
        ctx: zmq.asyncio.Context | None = None,
        retire_grace: float = PeerConfig.round_timeout,
        gate: Gatekeeper | None = None,
    ) -> None:
        """`ctx`: a context shared by the transports of co-hosted peers (one I/O thread, one ZAP
        handler for all); the transport then leaves its lifetime to the owner. `retire_grace`:
        how long a disconnected link keeps trying to deliver what waits on it (the peer's round
        deadline ceiling: after that the receiver has stopped waiting for it). `gate`: an open
        network's admission (with `curve`, which then holds our certificate and no peer list):
        DEALERs present the certificate, and only admitted connections' messages are received."""
        self.me = me
        self.neighbors = neighbors
        self.max_frame = max_frame
        self.queue_size = queue_size
        self.hwm = hwm
        self.curve = curve
        self.gate = gate
        self.owns_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self.router: zmq.Socket | None = None
        self.dealers: dict[int, zmq.Socket] = {}
        self.queues: dict[int, asyncio.Queue[Sequence[Any]]] = {}
        self.held: dict[int, asyncio.Future[None]] = {}  # a sender task's wait for room, with a message in hand
        self.retire_grace = retire_grace
        self.retiring: dict[int, asyncio.Task[None]] = {}  # disconnected links still delivering their queue
        self._rx_waiter: asyncio.Future[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.supervise: Callable[[asyncio.Task[None]], asyncio.Task[None]] | None = None  # the host watches the sender tasks
        self.stats = TransportStats()
        self.auth: AsyncioAuthenticator | None = None
        self.keycheck: _KnownKeys | Gatekeeper | None = None

    def _bind_endpoint(self) -> str:
        return f"tcp://{self.me.host}:{self.me.port}"

    async def start(self) -> None:
        if self.curve is not None and self.owns_ctx:
            self.keycheck = self.gate or _KnownKeys(self.curve)
            self.auth = AsyncioAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback(domain="*", credentials_provider=self.keycheck)
        r = zmq.Socket(self.ctx, zmq.ROUTER)
        if self.curve is not None:
            r.curve_secretkey = self.curve.secret
            r.curve_publickey = self.curve.public
            r.curve_server = True  # plaintext and unknown keys fail the handshake: no fallback
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.RCVHWM, self.hwm * 4)
        r.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        if self.curve is None:
            # Plaintext: routing ids are the self-declared peer ids, and a restarted neighbour takes
            # its id back. With CURVE the ZAP key is the identity; fixed routing ids plus hand-over
            # would let any key holder claim a neighbour's id and evict its connection.
            r.setsockopt(zmq.ROUTER_HANDOVER, 1)
        r.bind(self._bind_endpoint())
        self.router = r
        asyncio.get_running_loop().add_reader(r.FD, self._router_ready)
        for j, spec in self.neighbors.items():
            self.connect(j, spec)

    def connect(self, j: int, spec: PeerSpec) -> None:
        """Open a DEALER (and its send queue) to peer j. Called for every neighbour at start, and
        later for peers that are not base-graph neighbours but share a PPFM overlay edge. A link
        that is still retiring is taken back as it is, its queue in order."""
        retiring = self.retiring.pop(j, None)
        if retiring is not None:
            retiring.cancel()
        if j in self.dealers:
            return
        d = zmq.Socket(self.ctx, zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.IMMEDIATE, 1)
        d.setsockopt(zmq.SNDHWM, self.hwm)
        d.setsockopt(zmq.RECONNECT_IVL, 100)
        d.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve is None:
            d.setsockopt(zmq.IDENTITY, str(self.me.id).encode())
        else:
            d.curve_secretkey = self.curve.secret
            d.curve_publickey = self.curve.public
            d.curve_serverkey = self._server_key(j, spec)
            for prop in handshake_metadata(self.me.id, self.curve.cert) if self.gate and self.curve.cert else ():
                d.setsockopt(zmq.METADATA, prop)
        d.connect(dial_endpoint(self.me.id, spec))
        self.dealers[j] = d
        asyncio.get_running_loop().add_reader(d.FD, self._dealer_ready, j)
        self.queues[j] = asyncio.Queue(self.queue_size)
        task = asyncio.create_task(self._sender(j), name=f"send-{j}")
        self.tasks.append(self.supervise(task) if self.supervise is not None else task)

    def _server_key(self, j: int, spec: PeerSpec) -> bytes:
        """Peer j's CURVE key: the topology's; in an open network the one its address entry names
        (a bootstrap peer's, from the network file) or that of the certificate learned for it."""
        assert self.curve is not None
        key = self.curve.peers.get(j) or spec.extra.get("public_key") or (self.gate and self.gate.key_of(j))
        if not key:
            raise TopologyError(f"peer {j}: no CurveZMQ public key known (no certificate learned for it)")
        return key.encode() if isinstance(key, str) else key

    def disconnect(self, j: int) -> None:
        """Close the DEALER to a peer opened with `connect` once its queue and held message have
        left (at most `retire_grace` seconds; then what is left is dropped and counted)."""
        if j not in self.dealers or j in self.retiring:
            return
        self.retiring[j] = asyncio.create_task(self._retire(j), name=f"retire-{j}")

    async def _retire(self, j: int) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queues[j].join(), self.retire_grace)
        del self.retiring[j]
        self.flush(j)
        for t in [t for t in self.tasks if t.get_name() == f"send-{j}"]:
            t.cancel()
            self.tasks.remove(t)
        del self.queues[j]
        d = self.dealers.pop(j)
        asyncio.get_running_loop().remove_reader(d.FD)
        d.close(RETIRE_LINGER_MS)  # what the socket accepted is on its way: let the I/O thread send it

    # ZMQ_FD is readable while the socket has unprocessed commands (a message arrived, room was
    # freed); reading ZMQ_EVENTS processes them and clears it. The callbacks always read it, so a
    # level-triggered watcher never spins, and wake a waiter only for the event it waits for.

    def _router_ready(self) -> None:
        assert self.router is not None
        if self.router.get(zmq.EVENTS) & zmq.POLLIN and self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_result(None)

    def _dealer_ready(self, peer: int) -> None:
        room = self.dealers[peer].get(zmq.EVENTS) & zmq.POLLOUT
        w = self.held.get(peer)
        if room and w is not None and not w.done():
            w.set_result(None)

    def _require(self, peer: int) -> None:
        if peer not in self.queues:
            raise KeyError(f"peer {peer} is not a neighbour of {self.me.id}")

    def _try_send(self, peer: int, frames: Sequence[Any]) -> bool:
        try:
            self.dealers[peer].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self.stats.bytes_sent += frames_nbytes(frames)
        self.stats.messages_sent += 1
        return True

    def _try_direct(self, peer: int, frames: Sequence[Any]) -> bool:
        """Fast path: with nothing queued or held for the peer, a non-blocking send right away."""
        if peer in self.held or not self.queues[peer].empty():
            return False
        return self._try_send(peer, frames)

    def offer(self, peer: int, frames: Sequence[Any]) -> bool:
        """Send now or not at all (False): for periodic pings to a neighbour that is down, whose
        queued copies would only tell its next incarnation stale news."""
        self._require(peer)
        return self._try_direct(peer, frames)

    def send(self, peer: int, frames: Sequence[Any]) -> bool:
        """Send or queue a message for a neighbour; False (and counted) if its queue is full."""
        self._require(peer)
        if self._try_direct(peer, frames):
            return True
        try:
            self.queues[peer].put_nowait(frames)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            return False
        return True

    async def send_wait(self, peer: int, frames: Sequence[Any]) -> None:
        """Like `send`, but wait for room in the queue instead of dropping (back-pressure for bulk
        producers). This also waits while the peer is not connected (``ZMQ_IMMEDIATE``)."""
        self._require(peer)
        if not self._try_direct(peer, frames):
            await self.queues[peer].put(frames)

    def flush(self, peer: int) -> int:
        """Forget what waits for a neighbour that went down: its queue and the message its sender
        task holds (they would go out when it reconnects)."""
        q = self.queues[peer]
        n = 0
        while not q.empty():
            q.get_nowait()
            q.task_done()
            n += 1
        w = self.held.get(peer)
        if w is not None and not w.done():
            w.cancel()  # the sender task drops the message it holds
            n += 1
        self.stats.dropped += n
        return n

    def _sent_or_failed(self, peer: int, frames: Sequence[Any]) -> bool:
        """`_try_send` for the sender task: a socket error drops the message (counted, logged)
        instead of ending the task, which would leave the peer's queue undrained."""
        try:
            return self._try_send(peer, frames)
        except zmq.ZMQError as e:
            self.stats.dropped += 1
            log.warning("peer %s: send to %s failed: %s", self.me.id, peer, e)
            return True

    async def _sender(self, peer: int) -> None:
        """The one task that waits for room at the peer's socket, so queued messages keep their order.
        A failed send has read the socket's events, so the next change signals its FD."""
        q = self.queues[peer]
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        while True:
            frames = await q.get()
            while not self._sent_or_failed(peer, frames):
                w = self.held[peer] = loop.create_future()
                try:
                    await w
                except asyncio.CancelledError:
                    if w.cancelled() and task is not None and not task.cancelling():
                        break  # flushed; `flush` counted it
                    raise
                finally:
                    del self.held[peer]
            q.task_done()  # sent, or dropped: `_retire` waits on these

    async def recv(self) -> tuple[bytes, int | None, list[zmq.Frame]]:
        """Next message as (routing identity, CURVE-authenticated peer id or None, frames).
        One task receives (the peer's receive loop).

        The authenticated id comes from the ZAP handshake (the frame's User-Id is the sender's
        public key), so it cannot be forged by the sender, unlike the routing identity. In an open
        network it is the id the connection's certificate admits, and a message from a connection
        the gatekeeper refuses is dropped here (it counts it)."""
        r = self.router
        assert r is not None and self._rx_waiter is None, "one receiving task at a time"
        while True:
            try:
                frames = r.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # it read the events: the next message signals the FD
                self._rx_waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._rx_waiter
                finally:
                    self._rx_waiter = None
                continue
            self.stats.messages_received += 1
            self.stats.bytes_received += frames_nbytes(frames[1:])
            authed = None
            if self.curve is not None and len(frames) > 1:
                user = _property(frames[1], "User-Id") or ""  # pyzmq's ZAP handler names the key in Z85
                if self.gate is None:
                    authed = self.curve.peer_of(user.encode())
                else:
                    authed = self.gate.check(_property(frames[1], PEER_PROPERTY), user.encode(),
                                             functools.partial(_property, frames[1], CERT_PROPERTY), time.time())
                    if authed is None:
                        continue
            return frames[0].bytes, authed, frames[1:]

    async def drain(self, timeout: float) -> None:
        """Give queued messages (e.g. goodbyes) a moment to leave before closing."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end and (self.held or any(not q.empty() for q in self.queues.values())):
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for t in [*self.tasks, *self.retiring.values()]:
            t.cancel()
        for t in [*self.tasks, *self.retiring.values()]:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        loop = asyncio.get_running_loop()
        for d in self.dealers.values():
            loop.remove_reader(d.FD)
            d.close(0)
        if self.router is not None:
            loop.remove_reader(self.router.FD)
            self.router.close(0)
        if self.auth is not None:
            self.auth.stop()
        if self.owns_ctx:
            self.ctx.term()
