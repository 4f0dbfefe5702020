"""An open network's peer: a neighbourhood that is the HyParView active view, and a CHOCO mixer
on a neighbourhood that changes between rounds.

- `Open` drives one peer's `Views` (`core.membership.views`). Its neighbours are the active view;
  view messages travel as VIEW messages (`view_message`, `read_view`), taken from any
  admitted peer (admission is the transport's job), model messages only from active neighbours.
  Liveness runs over the active view (`Liveness`, heartbeats): a neighbour is down until heard
  from and goes down after `--peer-timeout` of silence, which `Views.down` turns into NEIGHBOR
  requests to passive entries; one never heard from within `--peer-timeout` of entering the
  active view (a link held at this end only: an accept or a goodbye was lost) goes the same way.
  Revocations (REVOKE view messages) are flooded on the active view and given to every new
  neighbour; a revoked peer leaves both views (`revoke`). `Views.tick` runs on the heartbeat; the first one sends the JOIN.
  The node does not start its first round before one active neighbour is alive (`ready`), so a
  joiner learns the network's round and catches up to it as a late peer of a static graph does.
- `OpenMixer` keeps a replica per link. At each round's start the links are the live active
  neighbours: a new one gets a replica (the engine's contact path gives both ends exact states:
  the first message of an unknown incarnation is answered with our state and a resync request),
  and a neighbour gone from the active view has its replica freed and its link closed. Each
  round's delta carries the sender's degree (``info["deg"]``, the links its delta went to) and
  its size-estimate minima (tensor ``_size``, epoch ``info["size"]``). Round r mixes with w_ij = 1/(1 + max(d_i(r),
  d_j(r))) (`mh_weights`) over the links whose delta of round r (or, late, an earlier one)
  came, so both ends of a link use the same weight and W is symmetric and doubly stochastic over
  the links mixed. A late neighbour is mixed with its stale replica at its last degree and the
  engine owes the missing term when its delta comes (`ChocoEngine.mix`); the weights are set
  just before each mix and kept until the next, so the debt of a delta one round late uses the
  weight of the round that was mixed. A new link takes part once its first delta came.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import torch

from p2pfl.config import PeerConfig
from p2pfl.core.admission import AdmissionError, Revocations, verify_revocation
from p2pfl.core.gossip import Action as Reply
from p2pfl.core.gossip import ChocoEngine, Refused, Replica
from p2pfl.core.membership.messages import ViewConfig, ViewKind, ViewMsg, ViewWireError, decode, encode
from p2pfl.core.membership.size import SizeError, SizeEstimator
from p2pfl.core.membership.views import Out, ViewRefused, Views, mh_weights
from p2pfl.core.state import zeros_like_state
from p2pfl.core.wire import BASE, Kind, Message, TensorPayload, frames_nbytes
from p2pfl.core.wire import encode as encode_message
from p2pfl.node.actions import Action, Flush, Send
from p2pfl.node.liveness import Liveness
from p2pfl.node.mixer import ChocoMixer
from p2pfl.node.neighbourhood import Neighbourhood

VIEW_TENSOR, VIEW_CODEC = "view", "msgpack"  # a VIEW message's one tensor
SIZE_TENSOR = "_size"  # a delta's size-estimate minima (K float32; the epoch in info["size"])
MAX_DEGREE = 1 << 16  # a degree claim above this is refused (an active view is a handful of peers)
NO_ESTIMATE = "open network: no peer knows n or the overlay's spectral gap, which the sketch flood and gossip estimator need"


def view_message(me: int, inc: int, vm: ViewMsg) -> Message:
    """A VIEW message: the view message's msgpack map (`messages.encode`) as one uint8 part, since
    a header holds no binary strings (docs/wire.md, section 3) and contact payloads are bytes."""
    raw = torch.frombuffer(bytearray(msgpack.packb(encode(vm), use_bin_type=True)), dtype=torch.uint8)
    return Message(Kind.VIEW, me, inc=inc, tensors={VIEW_TENSOR: TensorPayload(VIEW_CODEC, (raw.numel(),), {"data": raw})})


def read_view(msg: Message, cfg: ViewConfig) -> ViewMsg:
    """The view message of a VIEW message; `ViewWireError` for a malformed one or one longer than
    `ViewConfig.max_message_bytes` (checked before it is unpacked)."""
    tp = msg.tensors.get(VIEW_TENSOR)
    data = tp.parts.get("data") if tp is not None else None
    if set(msg.tensors) != {VIEW_TENSOR} or tp is None or tp.codec != VIEW_CODEC or set(tp.parts) != {"data"} \
            or data is None or data.dtype != torch.uint8 or data.dim() != 1:
        raise ViewWireError(f"view message from peer {msg.sender}: needs one tensor {VIEW_TENSOR!r}, codec {VIEW_CODEC!r}, "
                            "one uint8 part 'data'")
    if data.numel() > cfg.max_message_bytes:
        raise ViewWireError(f"view message from peer {msg.sender}: {data.numel()} bytes, over {cfg.max_message_bytes}")
    try:
        obj = msgpack.unpackb(data.numpy().tobytes(), raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ViewWireError(f"view message from peer {msg.sender}: not msgpack ({type(e).__name__})") from None
    return decode(obj, cfg)


class Open(Neighbourhood):
    def __init__(self, me: int, views: Views, contact: int | None, inc: int, cfg: PeerConfig, log: logging.Logger,
                 revocations: Revocations | None = None, wall: float = 0.0, shared: Revocations | None = None) -> None:
        """`contact`: the peer to join through (None: the first peer of a network, which waits to be
        joined). `revocations`: this peer's, which REVOKE messages add to (what is news here is
        passed on); `shared`: the host's
        gatekeeper's, which refuses a revoked key's messages and gets every revocation this
        peer applies; `wall`: unix time minus this node's clock, to read a revocation's expiry."""
        super().__init__(me, set(), cfg, log)
        self.views, self.contact, self.inc = views, contact, inc
        self.revocations, self.wall, self.shared = revocations, wall, shared
        self.view_bytes = 0  # view and revocation messages sent, as framed on the wire
        self.liveness = Liveness(me, [], cfg.peer_timeout, log)
        self._outbox: list[Action] = []
        self._unheard: dict[int, float] = {}  # active neighbours not heard from yet: since when
        self._joined = contact is None
        self._now = 0.0

    @property  # type: ignore[override]
    def neighbours(self) -> list[int]:
        return sorted(self.views.active)

    @property
    def live(self) -> set[int]:
        return self.liveness.live

    def describe(self) -> str:
        c = self.cfg
        how = f"joins through peer {self.contact}" if self.contact is not None else "waits to be joined"
        return (f"peer {self.me}: open network, {how}; active view of {self.views.cfg.active}, {c.rounds} rounds, "
                f"compress={c.compress}, run dir {c.run_dir}")

    def knows(self, peer: int) -> bool:
        return True  # any admitted peer may send view messages

    def ready(self) -> bool:
        """The network's first peer starts with its first neighbour; a joiner once a live
        neighbour runs rounds (a fellow joiner does not: both would start a network of their own
        at round 0), or at the start-up timeout."""
        return bool(self.live) and (self.contact is None or bool(self.running()))

    def running(self) -> dict[int, int]:
        """The rounds of the live neighbours that run rounds: a joiner's fellow joiners do not."""
        return {j: r for j, r in self.rounds.items() if j in self.live and r > 0}

    def claims(self) -> dict[int, int]:
        """Only peers that have run a round are evidence against a claim: fellow joiners at round 0
        must not make a joiner refuse the network's round (a lone liar can then set a joiner's
        first round; its honest neighbours, which compare, refuse it until the network gets there)."""
        return {j: r for j, r in self.rounds.items() if r > 0}

    def refuse(self, msg: Message) -> tuple[str, str] | None:
        if msg.channel != BASE:
            return "channel", f"{msg.channel}-channel message from peer {msg.sender}, but clustering is off here"
        if msg.sender not in self.views.active:  # a link closed while its messages travelled
            return "not-neighbour", f"{msg.kind.value} from peer {msg.sender}, which is not in the active view"
        return None

    def handle(self, msg: Message, now: float) -> list[Action] | None:
        """A VIEW message: its view message to `Views`; `Refused` with the rule that refuses it."""
        if msg.kind != Kind.VIEW:
            return None
        self._now = now
        try:
            vm = read_view(msg, self.views.cfg)
            out = self.views.receive(msg.sender, vm, now)
        except ViewWireError as e:
            raise Refused("view-malformed", f"from peer {msg.sender}: {e}") from None
        except ViewRefused as e:
            raise Refused(f"view-{e.reason}", str(e)) from None
        if vm.kind == ViewKind.REVOKE:
            return self.revoke(list(vm.revocations), now, msg.sender)
        return self._sends(out, now)

    def revoke(self, blobs: list[bytes], now: float, sender: int | None = None) -> list[Action]:
        """Apply the authority's revocations (from a neighbour, or the host's revocation file): a
        revoked peer leaves both views at once, and each revocation that is news here goes on to
        every other active neighbour, so a live peer applies it within the overlay's diameter in
        hops (docs/membership.md). `Refused` names one that does not verify; the others apply."""
        self._now = now
        if self.revocations is None:
            raise Refused("view-revoke", f"REVOKE from peer {sender}: this network has no admission authority")
        news, bad, out = [], None, []
        for blob in blobs:
            try:
                if self.revocations.add(blob, now + self.wall):
                    news.append(blob)
                    if self.shared is not None:
                        self.shared.add(blob, now + self.wall)
                    peer = verify_revocation(blob, self.revocations.authority_public, self.revocations.network).peer
                    self.log.warning("peer %d: peer %d is revoked (from %s)", self.me, peer, "the revocation file" if sender is None else f"peer {sender}")
                    out += self.views.down(peer, now)
                    self.liveness.drop(peer)
            except AdmissionError as e:
                bad = e
        acts = self._sends(out, now) + self._revocations_to([j for j in self.neighbours if j != sender], news)
        if bad is not None:
            self._outbox += acts
            raise Refused(f"revocation-{bad.reason}", f"from peer {sender}: {bad}")
        return acts

    def _revocations_to(self, peers: list[int], blobs: list[bytes]) -> list[Action]:
        k = self.views.cfg.max_entries
        chunks = [tuple(blobs[i:i + k]) for i in range(0, len(blobs), k)]
        return self._counted([Send(j, view_message(self.me, self.inc, ViewMsg(ViewKind.REVOKE, revocations=c))) for j in peers for c in chunks])

    def accepted(self, msg: Message, now: float) -> list[Action]:
        """A neighbour's message; one that comes up gets the revocations this peer knows (a joiner
        learns the ones issued before it came)."""
        self._now = now
        new = msg.sender not in self.liveness.live
        down = self.liveness.seen(msg.sender, now, alive=msg.kind != Kind.BYE)
        known = self.revocations.blobs() if new and self.revocations is not None and msg.sender in self.liveness.live else []
        return ([Flush(msg.sender)] if down else []) + self._drain() + self._revocations_to([msg.sender], known)

    def beat(self, now: float, heartbeat: Message) -> list[Action]:
        """Heartbeats to the active view, the view's timers (the JOIN, first), and neighbours
        silent too long reported down to the view, which asks passive entries to replace them."""
        self._now = now
        out: Out = []
        if not self._joined and self.contact is not None:
            self._joined = True
            out += self.views.join(self.contact, now)
        out += self.views.tick(now)
        acts: list[Action] = [Send(j, heartbeat, offer=j not in self.live) for j in self.neighbours]
        for j in self.liveness.expire(now):
            acts.append(Flush(j))
            out += self.views.down(j, now)
        for j in list(self._unheard):  # a link held at this end only (its accept or goodbye was lost) ends too
            if j not in self.views.active or j in self.live:
                del self._unheard[j]
            elif now - self._unheard[j] > self.cfg.peer_timeout:
                del self._unheard[j]
                self.log.warning("peer %d: neighbour %d never answered in %.1fs; replacing it", self.me, j, self.cfg.peer_timeout)
                out += self.views.down(j, now)
        for j in self.views.active - self.live.union(self._unheard):
            self._unheard[j] = now
        return acts + self._sends(out, now)

    def exclude(self, peer: int) -> bool:
        """A misbehaving neighbour is replaced, as a dead one is."""
        self._outbox += self._sends(self.views.down(peer, self._now), self._now)
        return self.liveness.drop(peer)

    def farewells(self) -> list[Action]:
        """DISCONNECT (leaving) to every active neighbour: they replace this peer from their passive views."""
        return self._sends(self.views.leave(self._now), self._now)

    def _sends(self, out: Out, now: float) -> list[Action]:
        """View messages as VIEW sends; the liveness set follows the active view."""
        for j in self.liveness.live - self.views.active:
            self.liveness.live.discard(j)
            self.liveness.last_seen.pop(j, None)
        sends: list[Action] = [Send(dest, view_message(self.me, self.inc, vm)) for dest, vm in out]
        return self._drain() + self._counted(sends)

    def _counted(self, sends: list[Action]) -> list[Action]:
        self.view_bytes += sum(frames_nbytes(encode_message(a.msg)) for a in sends if isinstance(a, Send))
        return sends

    def _drain(self) -> list[Action]:
        out, self._outbox = self._outbox, []
        return out


class OpenMixer(ChocoMixer):
    """CHOCO on the active view: replicas follow the links, weights follow the degrees that ride on deltas."""

    def __init__(self, engine: ChocoEngine, size: SizeEstimator) -> None:
        super().__init__(engine)
        self.size = size
        self._links: set[int] = set()  # the peers this round's delta went to
        self._degree = 0
        self._deg: dict[int, dict[int, int]] = {}  # neighbour -> round -> the degree its delta of that round carried
        self._gone: list[int] = []
        self._view_bytes = 0  # the neighbourhood's view bytes at the last record

    def synced(self, peer: int) -> bool:
        rep = self.engine.replicas.get(peer)
        return rep is not None and rep.synced

    def _link(self, peer: int) -> None:
        self.engine.replicas[peer] = Replica(xhat=zeros_like_state(self.engine.x))
        self.engine.weights[peer] = 0.0
        self._deg[peer] = {}

    def outgoing(self, rnd: int, training: bool, nbh: Neighbourhood) -> list[Reply]:
        active = set(nbh.neighbours)
        self._gone = sorted(set(self.engine.replicas) - active)
        for j in self._gone:
            del self.engine.replicas[j], self.engine.weights[j], self._deg[j]
        self._links = set(nbh.live)
        for j in self._links - set(self.engine.replicas):
            self._link(j)
        self._degree = len(self._links)
        delta = self.engine.make_delta(rnd, empty=not training)
        size = self.size.outgoing(rnd)
        minima = torch.frombuffer(bytearray(size["v"]), dtype=torch.float32)
        delta.tensors[SIZE_TENSOR] = TensorPayload("none", (minima.numel(),), {"data": minima})
        delta.info.update(deg=self._degree, size=size["e"])
        return [(j, delta) for j in sorted(self._links)]

    def released(self, rnd: int) -> list[int]:
        gone, self._gone = self._gone, []
        return gone

    def receive(self, msg: Message) -> list[Reply]:
        j = msg.sender
        if j not in self.engine.replicas:  # an active neighbour linked since our round began
            self._link(j)
        deg = msg.info.get("deg") if msg.kind == Kind.DELTA else None
        if msg.kind == Kind.DELTA and (type(deg) is not int or not 1 <= deg <= MAX_DEGREE):
            raise Refused("degree", f"delta {msg.seq} from peer {j}: info 'deg' must be an int in [1, {MAX_DEGREE}], got {deg!r}"[:200])
        minima = msg.tensors.pop(SIZE_TENSOR, None) if msg.kind == Kind.DELTA else None
        replies = self.engine.receive(msg)
        if deg is not None:
            seen = self._deg[j]
            seen[msg.round] = deg
            for r in [r for r in seen if r < msg.round - self.engine.window]:
                del seen[r]
            data = minima.parts.get("data") if minima is not None else None
            raw = data.numpy().tobytes() if data is not None and data.dtype == torch.float32 and data.dim() == 1 else None
            try:
                self.size.receive({"e": msg.info.get("size"), "v": raw}, max(self.engine.round, 0))
            except SizeError as e:  # the delta applied; only the estimate's minima are refused
                raise Refused("size-estimate", f"from peer {j}: {e}", replies) from None
        return replies

    def _degree_of(self, peer: int, rnd: int) -> int | None:
        """The degree `peer` sent with its round-`rnd` delta, else with its latest earlier one."""
        seen = self._deg.get(peer) or {}
        earlier = [r for r in seen if r <= rnd]
        return seen[max(earlier)] if earlier else None

    def waiting_for(self, rnd: int, training: bool, nbh: Neighbourhood, banned: set[int]) -> list[int]:
        """Every live link of the round: a new one's other end sends on it this round once it has
        heard from us too, else the deadline ends the wait (once per link)."""
        return sorted(self.engine.waiting_for(rnd, nbh.participants(rnd) & self._links))

    def mix(self, rnd: int, nbh: Neighbourhood, banned: set[int]) -> dict[str, Any]:
        use: dict[int, int] = {}
        for j in sorted(nbh.participants(rnd) & self._links):
            d = self._degree_of(j, rnd)
            if d is not None and self.synced(j):
                use[j] = d
        w = mh_weights(self._degree, use, self.engine.me)
        for j in use:
            self.engine.weights[j] = w[j]
        self.engine.mix(use)
        sent = nbh.view_bytes if isinstance(nbh, Open) else 0
        view_bytes, self._view_bytes = sent - self._view_bytes, sent
        return {"network_size_estimate": self.size.estimate(rnd), "degree": self._degree, "mixed_with": sorted(use),
                "active": sorted(nbh.neighbours), "view_bytes": view_bytes,
                "consensus_absent": NO_ESTIMATE}
