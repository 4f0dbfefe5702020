"""Asyncio ZeroMQ transport: one ROUTER bound per peer, one DEALER per neighbour.

It moves frame lists and nothing else: no protocol logic lives here.  Sends never block the
event loop: each neighbour has a bounded queue drained by its own task, DEALERs use
ZMQ_IMMEDIATE (nothing queues for a peer that is not connected) and a send high-water mark; a
full queue drops the message and counts it (CHOCO's sequence numbers turn that into a resync).
When a neighbour goes down, `flush` drops what waits for it, in the queue and at the socket, and
pings go out with `offer` (now or never): otherwise its next incarnation would first receive
seconds-old messages, with old round numbers, when the DEALER reconnects.
The ROUTER's routing id is the sender's DEALER identity, which the peer checks against the
header's sender field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from p2pfl.topology import PeerSpec
from p2pfl.wire import frames_nbytes

log = logging.getLogger("p2pfl.transport")


@dataclass
class CurveKeys:
    """CurveZMQ keys (Z85 bytes): ours, and every peer's public key from the topology file."""

    public: bytes
    secret: bytes
    peers: dict[int, bytes] = field(default_factory=dict)

    def peer_of(self, public: bytes) -> int | None:
        for p, k in self.peers.items():
            if k == public:
                return p
        return None


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


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    dropped: int = 0


class Transport:
    def __init__(
        self,
        me: PeerSpec,
        neighbors: dict[int, PeerSpec],
        max_frame: int,
        queue_size: int = 64,
        hwm: int = 64,
        curve: CurveKeys | None = None,
    ) -> None:
        self.me = me
        self.neighbors = neighbors
        self.max_frame = max_frame
        self.queue_size = queue_size
        self.hwm = hwm
        self.curve = curve
        self.ctx = zmq.asyncio.Context()
        self.router: zmq.asyncio.Socket | None = None
        self.rdirect: zmq.Socket | None = None  # sync shadow of the ROUTER for the fast path
        self.dealers: dict[int, zmq.asyncio.Socket] = {}
        self.direct: dict[int, zmq.Socket] = {}  # sync shadows of the DEALERs for the fast path
        self.inflight: dict[int, set[asyncio.Future[Any]]] = {}  # awaited sends the socket has not taken
        self.queues: dict[int, asyncio.Queue[Sequence[Any]]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.stats = TransportStats()
        self.auth: AsyncioAuthenticator | None = None
        self.keycheck: _KnownKeys | None = None

    def _bind_endpoint(self) -> str:
        return f"tcp://{self.me.host}:{self.me.port}"

    async def start(self) -> None:
        if self.curve is not None:
            self.keycheck = _KnownKeys(self.curve)
            self.auth = AsyncioAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback(domain="*", credentials_provider=self.keycheck)
        r = self.ctx.socket(zmq.ROUTER)
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
        self.rdirect = zmq.Socket.shadow(r.underlying)
        for j, spec in self.neighbors.items():
            self.connect(j, spec)

    def connect(self, j: int, spec: PeerSpec) -> None:
        """Open a DEALER (and its send queue) to peer j. Called for every neighbour at start, and
        later for peers that are not base-graph neighbours but share a PPFM overlay edge."""
        if j in self.dealers:
            return
        d = self.ctx.socket(zmq.DEALER)
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
            d.curve_serverkey = self.curve.peers[j]
        d.connect(spec.endpoint)
        self.dealers[j] = d
        self.direct[j] = zmq.Socket.shadow(d.underlying)
        self.inflight[j] = set()
        self.queues[j] = asyncio.Queue(self.queue_size)
        self.tasks.append(asyncio.create_task(self._sender(j), name=f"send-{j}"))

    def disconnect(self, j: int) -> None:
        """Close the DEALER to a peer opened with `connect`; what waits for it is dropped, as in `flush`."""
        if j not in self.dealers:
            return
        self.flush(j)
        for t in [t for t in self.tasks if t.get_name() == f"send-{j}"]:
            t.cancel()
            self.tasks.remove(t)
        del self.queues[j], self.inflight[j], self.direct[j]
        self.dealers.pop(j).close(0)

    def _require(self, peer: int) -> None:
        if peer not in self.queues:
            raise KeyError(f"peer {peer} is not a neighbour of {self.me.id}")

    def _try_direct(self, peer: int, frames: Sequence[Any]) -> bool:
        """Fast path: with nothing queued, a non-blocking send right away (no task switch)."""
        if not self.queues[peer].empty() or self.inflight[peer]:
            return False
        try:
            self.direct[peer].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._count_sent(frames)
        return True

    def _count_sent(self, frames: Sequence[Any]) -> None:
        self.stats.bytes_sent += frames_nbytes(frames)
        self.stats.messages_sent += 1

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
        """Like `send`, but wait for room instead of dropping (back-pressure for bulk producers).

        While nothing is queued for the peer, the message waits on the socket itself (pyzmq's
        ordered send futures) rather than hop through the queue and the sender task, which costs
        as much CPU as the header. So this also waits while the peer is not connected
        (``ZMQ_IMMEDIATE``)."""
        self._require(peer)
        if self._try_direct(peer, frames):
            return
        if not self.queues[peer].empty():  # stay behind what is queued
            await self.queues[peer].put(frames)
            return
        await self._send_async(peer, frames)

    async def _send_async(self, peer: int, frames: Sequence[Any]) -> None:
        """Await the socket taking ``frames``; direct sends stay off while this is pending, so
        order holds. `flush` may cancel the send (not the caller)."""
        fut = self.dealers[peer].send_multipart(frames, copy=False)
        pending = self.inflight[peer]
        pending.add(fut)
        try:
            await fut
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if fut.cancelled() and task is not None and not task.cancelling():
                return  # flushed; `flush` counted it
            raise
        except zmq.ZMQError as e:
            self.stats.dropped += 1
            log.warning("peer %s: send to %s failed: %s", self.me.id, peer, e)
            return
        finally:
            pending.discard(fut)
        self._count_sent(frames)

    def flush(self, peer: int) -> int:
        """Forget what waits for a neighbour that went down: its queue and the sends that the
        socket has not taken (they would go out when it reconnects)."""
        q = self.queues[peer]
        n = 0
        while not q.empty():
            q.get_nowait()
            n += 1
        for fut in list(self.inflight[peer]):
            n += fut.cancel()
        self.stats.dropped += n
        return n

    async def _sender(self, peer: int) -> None:
        q = self.queues[peer]
        while True:
            await self._send_async(peer, await q.get())

    async def recv(self) -> tuple[bytes, int | None, list[zmq.Frame]]:
        """Next message as (routing identity, CURVE-authenticated peer id or None, frames).

        The authenticated id comes from the ZAP handshake (the frame's User-Id is the sender's
        public key), so it cannot be forged by the sender, unlike the routing identity."""
        assert self.router is not None and self.rdirect is not None
        try:  # fast path: a message is waiting, take it without a future (as `_try_direct` sends)
            frames = self.rdirect.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            frames = await self.router.recv_multipart(copy=False)
        self.stats.messages_received += 1
        self.stats.bytes_received += frames_nbytes(frames[1:])
        authed = None
        if self.curve is not None and len(frames) > 1:
            user = frames[1].get("User-Id")
            authed = self.curve.peer_of(user.encode() if isinstance(user, str) else user)
        return frames[0].bytes, authed, frames[1:]

    async def drain(self, timeout: float) -> None:
        """Give queued messages (e.g. goodbyes) a moment to leave before closing."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end and any(not q.empty() for q in self.queues.values()):
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for d in self.dealers.values():
            d.close(0)
        if self.router is not None:
            self.router.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
