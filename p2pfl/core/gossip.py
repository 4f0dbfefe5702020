"""Sans-IO CHOCO-Gossip engine (Koloskova, Stich, Jaggi, ICML 2019).

Per round t on peer i:  q_i = Q(x_i - xhat_i);  xhat_i += q_i;  send q_i to every neighbour;
apply each neighbour's q_j to the replica xhat_j strictly in sequence order;
x_i += gamma * sum_j w_ij (xhat_j - xhat_i).
With the identity codec and gamma = 1 this is exact gossip averaging x <- W x.

A round mixed with a neighbour's replica before its delta of that round came (the deadline
passed) would move the network mean: the neighbour adds its half of the pair, we did not. The engine remembers those
rounds and, as the missing delta applies, owes gamma * w_ij * q_j for each of them; the debt is
added to x at the next mix (`settle`), so both ends have mixed the same pair (docs/wan.md). A delta
lost on the way (a reset connection) is a late delta too: the sender keeps its last `window`
deltas and answers a request naming the gap (`GAP`) with them, so what was owed is paid as they
apply; only a gap it no longer holds is answered with a state, which cannot say what was owed.

The engine is pure: it consumes and produces `wire.Message`s and never touches sockets or
clocks, so every protocol path (gaps, restarts, resyncs) is unit-tested in-process.  Replicas
stay bit-identical with the sender because both apply the same decoded tensor with the same op.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from p2pfl.core.codec import CodecError, Encoded
from p2pfl.core.compress import CompressionPlan, get_codec
from p2pfl.core.robust import NormGuard, RobustSpec, robust_step
from p2pfl.core.state import State, clone_state, zeros_like_state
from p2pfl.core.wire import Kind, Message, TensorPayload
from p2pfl.errors import P2pflError

Action = tuple[int, Message]  # (destination peer, message)
FLAT = "_flat"  # name of the single tensor a flat delta carries
ASK_AGAIN = 4  # rounds of ours before a state asked for and not applied is asked for again
GAP = "gap"  # a resync's info key: [first, end), the sequence numbers its asker lacks (docs/wire.md section 6)


class GossipError(P2pflError, ValueError):
    """A message that the protocol cannot use (unknown peer, wrong layout, bad codec data)."""


class Refused(GossipError):
    """A well-formed message outside what this peer keeps for a neighbour (a sequence number or
    round beyond the window, a full-state request over the rate). `reason` names the rule for
    counting; `replies` (at most one resync) still go out."""

    def __init__(self, reason: str, detail: str, replies: list[Action] | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.replies = replies or []


@dataclass
class Replica:
    """What peer i knows of neighbour j's public copy xhat_j."""

    xhat: State
    inc: int | None = None  # the incarnation of j this replica follows; None before first contact
    next_seq: int = 0
    round: int = -1  # latest round whose delta is in xhat
    synced: bool = True
    resync_asked: bool = False
    asked_round: int = -1  # our round when we last asked for its state
    pending: dict[int, tuple[int, State]] = field(default_factory=dict)  # seq -> (round, decoded q)
    state_round: int | None = None  # our round when this neighbour last got our full state
    state_owed: bool = False  # it asked again in that round: the answer waits for our next round
    stale: list[int] = field(default_factory=list)  # our rounds mixed with this replica before it held that round
    gap: tuple[int, int] | None = None  # the sequence numbers [first, end) asked for again and not yet applied
    owed_gap: tuple[int, int] | None = None  # the gap of a request whose answer the rate limit deferred


@dataclass
class RoundStats:
    round: int
    compression_error: float = 0.0  # ||Q(v) - v|| / ||v|| of this round's delta
    payload_bytes: int = 0
    dense_bytes: int = 0


class ChocoEngine:
    # A neighbour of a new incarnation gets our full state at once: on an undirected edge it
    # holds a replica of us. On a directed edge (`p2pfl.core.scheduled.EdgeEngine`) the sender does not.
    answers_contact = True

    def __init__(
        self,
        me: int,
        weights: dict[int, float],
        x: State,
        plan: CompressionPlan | str = "none",
        gamma: float | None = None,
        seed: int = 0,
        inc: int = 0,
        robust: RobustSpec | str = "off",
        norm_factor: float = 0.0,
        window: int = 8,
    ) -> None:
        """`window`: deltas kept per neighbour beyond the next one in sequence, and rounds a delta
        may run ahead of what was applied; it bounds a neighbour's buffered state at `window`
        decoded models."""
        if me in weights:
            raise GossipError(f"weights: peer {me} must not list itself as a neighbour")
        if window < 1:
            raise GossipError(f"window: at least one buffered delta per neighbour, got {window}")
        self.me = me
        self.window = window
        self.round_window = window  # rounds; an engine that sends every K rounds needs K times more
        self.weights = dict(weights)
        self.plan = CompressionPlan.parse(plan) if isinstance(plan, str) else plan
        self.gamma = gamma if gamma is not None else min(self.plan.codec_for(k).default_gamma for k in x)
        self.seed = seed
        self.inc = inc
        self.x: State = clone_state(x)
        self.layout = {k: tuple(v.shape) for k, v in self.x.items()}
        self.order = sorted(self.layout)  # flat deltas concatenate the tensors in this order
        self.numel = sum(math.prod(s) for s in self.layout.values())
        # One block-local codec for every tensor: send the whole delta as one flat tensor, since
        # per-tensor descriptors are a sizeable share of a small compressed delta's bytes
        # (docs/benchmarks.md). Per-tensor plans, and codecs driven by whole-tensor statistics
        # (sign:tensor, top-k, random-k) whose behaviour flattening would change, keep one payload
        # per tensor.
        self.flat = not self.plan.overrides and self.plan.default.local
        self.xhat: State = zeros_like_state(self.x)
        self.out_seq = 0
        self.sent: dict[int, Message] = {}  # our last `window` deltas by seq, to answer a gap with
        self.round = -1
        self.replicas = {j: Replica(xhat=zeros_like_state(self.x)) for j in self.weights}
        self.robust = RobustSpec.parse(robust) if isinstance(robust, str) else robust
        self.guard = NormGuard(norm_factor)
        self.duplicates = 0
        self.last_stats = RoundStats(round=-1)
        self.owed: State | None = None  # gamma * w_ij * q_j for late deltas of rounds mixed without them
        self.settled = 0  # late deltas whose missing term was owed (one count per round mixed without it)
        self.gaps = 0  # requests for deltas lost on the way
        self.states = 0  # full states that replaced a replica

    # ------------------------------------------------------------------ sending

    def set_x(self, x: State) -> None:
        """Take the trainer's new local model (same layout)."""
        self._check_layout(x, "local state")
        self.x = clone_state(x)

    def make_delta(self, rnd: int, empty: bool = False) -> Message:
        """Step 2: compress x - xhat, advance xhat, and return the DELTA every neighbour gets.

        `empty` sends a delta with no tensors (drain rounds: only sketches travel), which keeps
        sequence numbers and round bookkeeping identical on both sides.
        """
        if rnd <= self.round:
            raise GossipError(f"round: {rnd} is not after the last round {self.round}")
        self.round = rnd
        tensors: dict[str, TensorPayload] = {}
        stats = RoundStats(round=rnd)
        err2 = ref2 = 0.0
        if not empty:
            if self.flat:
                v = torch.cat([(self.x[n] - self.xhat[n]).reshape(-1) for n in self.order])
                named = [(FLAT, v, self.plan.default)]
            else:
                named = [(n, self.x[n] - self.xhat[n], self.plan.codec_for(n)) for n in self.order]
            for idx, (name, v, codec) in enumerate(named):
                enc = codec.encode(v.contiguous(), seed=self._codec_seed(self.out_seq, idx))
                q = codec.decode(enc, tuple(v.shape))
                err2 += float(((q - v) ** 2).sum())
                ref2 += float((v**2).sum())
                tensors[name] = TensorPayload(codec=codec.spec, shape=tuple(v.shape), parts=dict(enc.parts), meta=dict(enc.meta))
                stats.payload_bytes += sum(p.numel() * p.element_size() for p in enc.parts.values())
                stats.dense_bytes += v.numel() * 4
                for k, qk in (self._split(q) if name == FLAT else {name: q}).items():
                    self.xhat[k] += qk
        stats.compression_error = math.sqrt(err2 / ref2) if ref2 > 0 else 0.0
        self.last_stats = stats
        msg = Message(Kind.DELTA, self.me, round=rnd, seq=self.out_seq, inc=self.inc, tensors=tensors)
        if self.replicas:  # kept as sent (a mixer may add to it); an engine without neighbours only encodes
            self.sent[msg.seq] = msg
            self.sent.pop(msg.seq - self.window, None)
        self.out_seq += 1
        self._drain_all()
        return msg

    def state_message(self) -> Message:
        """A full, exact copy of xhat_i: the answer to a resync request."""
        exact = get_codec("none")
        tensors = {}
        for k, v in self.xhat.items():  # a copy: xhat moves on while the message may still be queued
            enc = exact.encode(v.clone())
            tensors[k] = TensorPayload(codec=exact.spec, shape=tuple(v.shape), parts=dict(enc.parts), meta=dict(enc.meta))
        return Message(Kind.STATE, self.me, round=max(self.round, 0), seq=self.out_seq, inc=self.inc, tensors=tensors)

    def _control(self, kind: Kind) -> Message:
        return Message(kind, self.me, round=max(self.round, 0), seq=self.out_seq, inc=self.inc)

    def hello(self) -> Message:
        return self._control(Kind.HELLO)

    def heartbeat(self) -> Message:
        return self._control(Kind.HEARTBEAT)

    def bye(self) -> Message:
        return self._control(Kind.BYE)

    def _codec_seed(self, seq: int, idx: int) -> int:
        return (self.seed * 1_000_003 + self.me * 7_919 + seq * 131 + idx) & 0x7FFFFFFF

    # ---------------------------------------------------------------- receiving

    def receive(self, msg: Message) -> list[Action]:
        """Feed one validated wire message; returns the messages to send in response."""
        rep = self.replicas.get(msg.sender)
        if rep is None:
            raise GossipError(f"sender: peer {msg.sender} is not a neighbour of {self.me}")
        if msg.kind == Kind.BYE:
            if rep.inc is not None and msg.inc < rep.inc:
                raise GossipError(f"peer {msg.sender}: goodbye from stale incarnation {msg.inc} (replayed)")
            return []
        actions = self._check_incarnation(rep, msg)
        if msg.kind == Kind.DELTA:
            actions += self._on_delta(rep, msg)
        elif msg.kind == Kind.STATE:
            self._on_state(rep, msg)
        elif msg.kind == Kind.RESYNC:
            try:
                actions += self._give_state(msg.sender, rep, wanted(msg))
            except Refused as e:
                e.replies = actions + e.replies
                raise
        elif msg.kind in (Kind.HEARTBEAT, Kind.HELLO):
            actions += self._ask_gap(msg.sender, rep, msg.seq)  # it sent deltas up to seq - 1: one lost on the way shows
        return actions

    def _give_state(self, peer: int, rep: Replica, gap: tuple[int, int] | None = None) -> list[Action]:
        """Answer a request: the deltas of `gap` when we still hold them all, else our full state.
        At most one answer per neighbour per round of ours: a small request must not buy a whole
        model (or `window` deltas) each time. A second request waits for the next round (`take_owed`)."""
        if rep.state_round == self.round:
            if rep.state_owed:
                raise Refused("state-rate", f"peer {peer}: another full-state request in round {self.round}; one is already owed")
            rep.state_owed, rep.owed_gap = True, gap
            return []
        rep.state_round, rep.state_owed, rep.owed_gap = self.round, False, None
        kept = self._kept(gap)
        return [(peer, m) for m in kept] if kept else [(peer, self.state_message())]

    def _kept(self, gap: tuple[int, int] | None) -> list[Message]:
        """Our deltas [first, end) as sent, or [] where one is no longer kept (or never was)."""
        if gap is None or gap[1] - gap[0] > len(self.sent) or gap[1] > self.out_seq:
            return []
        out = [self.sent[s] for s in range(*gap) if s in self.sent]
        return out if len(out) == gap[1] - gap[0] else []

    def take_owed(self) -> list[Action]:
        """The answers deferred by the rate limit, due now that our round has moved on."""
        out: list[Action] = []
        for j, rep in sorted(self.replicas.items()):
            if rep.state_owed and rep.state_round != self.round:
                out += self._give_state(j, rep, rep.owed_gap)
        return out

    def overdue(self) -> list[Action]:
        """Ask again for states that have not come: a state lost on the way, or refused on
        arrival (damaged, or from a buggy sender), would otherwise leave its replica waiting and
        its sender's deltas refused for the rest of the run. A replica waiting for a state it did
        not ask for (one that came on first contact and was refused) asks now; one that asked
        asks again `ASK_AGAIN` rounds later, a pace well under the sender's rate limit."""
        out: list[Action] = []
        for j, rep in sorted(self.replicas.items()):
            if not rep.synced and (not rep.resync_asked or self.round - rep.asked_round >= ASK_AGAIN):
                out.append(self._ask_resync(j, rep))
            elif rep.synced and rep.gap is not None and self.round - rep.asked_round >= ASK_AGAIN:
                end, rep.gap = rep.gap[1], None  # the deltas asked for were lost too
                out += self._ask_gap(j, rep, end)
        return out

    def forget(self, peer: int) -> Action:
        """Drop what we hold of a neighbour (after ignoring it for a while) and ask for its state."""
        rep = self.replicas[peer]
        rep.pending.clear()
        rep.stale.clear()
        rep.synced, rep.gap = False, None
        return self._ask_resync(peer, rep)

    def _check_incarnation(self, rep: Replica, msg: Message) -> list[Action]:
        """Every message carries seq = number of deltas its sender had sent before it, so the
        first message of a new incarnation tells whether its xhat is still the all-zero start."""
        if rep.inc == msg.inc:
            return []
        if rep.inc is not None and msg.inc < rep.inc:
            # Incarnations grow (start time in microseconds): an older one is a replay or a zombie.
            raise GossipError(f"peer {msg.sender}: stale incarnation {msg.inc} < {rep.inc} (replayed or old message)")
        rep.inc = msg.inc
        rep.pending.clear()
        rep.stale.clear()
        rep.resync_asked, rep.gap = False, None
        actions: list[Action] = []
        if msg.seq == 0:
            rep.xhat = zeros_like_state(self.x)
            rep.next_seq, rep.round, rep.synced = 0, -1, True
        else:
            rep.synced = False
            if msg.kind != Kind.STATE:
                actions.append(self._ask_resync(msg.sender, rep))
        if self.answers_contact and self.out_seq > 0:
            # Its replica of us is fresh (or stale) and ours has moved: give it our exact xhat.
            # (Before our first delta xhat is zero, which a fresh replica already is.)
            try:
                actions += self._give_state(msg.sender, rep)
            except Refused as e:
                e.replies = actions + e.replies
                raise
        return actions

    def _ask_resync(self, peer: int, rep: Replica) -> Action:
        rep.resync_asked, rep.asked_round = True, self.round
        return (peer, self._control(Kind.RESYNC))

    def _ask_gap(self, peer: int, rep: Replica, upto: int, regrow: bool = False) -> list[Action]:
        """A synced replica whose next delta is missing while later ones (before `upto`, or
        buffered) were sent asks for the missing ones. It stays in use meanwhile, as a late
        neighbour's does, and what its rounds lacked is owed as the deltas apply. A gap already
        asked for is asked for again, whole, at `ASK_AGAIN`, or (`regrow`: a delta came past it)
        once it has grown and a round has passed: the request may have been lost with the link
        that lost the deltas. Regrowth needs a new delta, so the sender is asked at most once per
        delta it sends, within its rate limit."""
        if not rep.synced or rep.next_seq in rep.pending:
            return []
        end = min([*rep.pending, upto])
        if end <= rep.next_seq or (rep.gap is not None and (not regrow or end <= rep.gap[1] or self.round == rep.asked_round)):
            return []
        rep.gap, rep.asked_round = (rep.next_seq, end), self.round
        self.gaps += 1
        msg = self._control(Kind.RESYNC)
        msg.info[GAP] = list(rep.gap)
        return [(peer, msg)]

    def _split(self, flat: torch.Tensor) -> State:
        """A flat vector back into the layout's named tensors (views, in `order`)."""
        out, at = {}, 0
        for k in self.order:
            n = math.prod(self.layout[k])
            out[k] = flat[at : at + n].reshape(self.layout[k])
            at += n
        return out

    def _decode_one(self, msg: Message, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tp = msg.tensors[name]
        if tuple(tp.shape) != shape:
            raise GossipError(f"tensor {name!r} from peer {msg.sender}: shape {list(tp.shape)}, expected {list(shape)}")
        try:
            q = get_codec(tp.codec).decode(Encoded(parts=tp.parts, meta=tp.meta), shape)
        except CodecError as e:
            raise GossipError(f"tensor {name!r} from peer {msg.sender}: {e}") from None
        return q.to(torch.float32).reshape(shape)

    def _decode(self, msg: Message) -> State:
        """Either one flat tensor or one tensor per layout name (whichever the sender's plan made)."""
        if set(msg.tensors) == {FLAT}:
            return self._split(self._decode_one(msg, FLAT, (self.numel,)))
        if set(msg.tensors) != set(self.layout):
            missing = sorted(set(self.layout) - set(msg.tensors))[:3]
            extra = sorted(set(msg.tensors) - set(self.layout))[:3]
            raise GossipError(f"tensors from peer {msg.sender}: layout mismatch (missing {missing}, unexpected {extra})")
        return {name: self._decode_one(msg, name, self.layout[name]) for name in msg.tensors}

    def _admit(self, rep: Replica, msg: Message) -> None:
        """Refuse, before decoding anything, a delta this peer would have to hold beyond its window."""
        if not rep.synced:
            return  # the coming state decides what applies; `_on_delta` keeps the newest `window`
        ahead = msg.seq - rep.next_seq
        if ahead >= self.window:
            replies = [] if rep.resync_asked else [self._ask_resync(msg.sender, rep)]
            rep.synced, rep.gap = False, None
            rep.pending.clear()
            raise Refused("seq-window", f"delta {msg.seq} from peer {msg.sender}: {ahead} ahead of the next expected "
                          f"{rep.next_seq} (window {self.window})", replies)
        ref = max(rep.round, self.round)
        if msg.round > ref + self.round_window:
            raise Refused("round-window", f"delta of round {msg.round} from peer {msg.sender}: more than {self.round_window} rounds "
                          f"past round {ref}")

    def _on_delta(self, rep: Replica, msg: Message) -> list[Action]:
        if msg.seq < rep.next_seq and rep.synced:
            self.duplicates += 1
            return []
        self._admit(rep, msg)
        q = self._decode(msg) if msg.tensors else {}
        if q:
            problem = self.guard.check(math.sqrt(sum(float((v**2).sum()) for v in q.values())))
            if problem is not None:
                raise GossipError(f"delta {msg.seq} from peer {msg.sender}: {problem}")
        if msg.seq in rep.pending:
            self.duplicates += 1
            return []
        rep.pending[msg.seq] = (msg.round, q)
        evicted = None
        if len(rep.pending) > self.window:  # only while awaiting a state, which supersedes the oldest
            evicted = min(rep.pending)
            del rep.pending[evicted]
        self._drain(rep)
        actions = self._ask_gap(msg.sender, rep, msg.seq, regrow=True)
        if evicted is not None:
            raise Refused("seq-window", f"peer {msg.sender}: more than {self.window} deltas buffered while awaiting its state; "
                          f"dropped delta {evicted}", actions)
        return actions

    def _on_state(self, rep: Replica, msg: Message) -> None:
        if rep.synced and msg.seq < rep.next_seq:
            return  # older than what we already applied
        state = self._decode(msg)
        rep.xhat = {k: v.clone() for k, v in state.items()}
        self.states += 1
        rep.stale.clear()  # which of the deltas it holds those rounds lacked is not known: the debt lapses
        # A state holds the deltas before `seq`, the last of them of round `round`; with seq 0 it is
        # the all-zero start and holds no round.
        rep.next_seq, rep.round, rep.synced, rep.resync_asked, rep.gap = msg.seq, msg.round if msg.seq > 0 else -1, True, False, None
        for s in [s for s in rep.pending if s < msg.seq]:
            del rep.pending[s]
        self._drain(rep)

    def _drain(self, rep: Replica) -> None:
        """Apply buffered deltas in sequence order, but none from a round we have not reached.

        Holding back a neighbour's round t+1 delta until we mix round t+1 keeps both ends of an
        edge mixing the same versions, which is what preserves the network mean exactly.
        """
        while rep.synced and rep.next_seq in rep.pending and rep.pending[rep.next_seq][0] <= self.round:
            rnd, q = rep.pending.pop(rep.next_seq)
            for k, v in q.items():
                rep.xhat[k] += v
            rep.next_seq += 1
            rep.round = max(rep.round, rnd)
            if rep.stale:
                self._owe(rep, rnd, q)
        if rep.gap is not None and rep.next_seq >= rep.gap[1]:
            rep.gap = None

    def _owe(self, rep: Replica, rnd: int, q: State) -> None:
        """A delta of round `rnd` applied after rounds >= `rnd` were mixed without it: what each of
        those mixes left out of the pair is owed. Rounds the replica now holds are settled."""
        times = sum(1 for s in rep.stale if s >= rnd)
        rep.stale = [s for s in rep.stale if s > rep.round]
        if not times or not q:
            return
        j = next(p for p, r in self.replicas.items() if r is rep)
        if self.owed is None:
            self.owed = zeros_like_state(self.x)
        for k, v in q.items():
            self.owed[k] += (self.gamma * self.weights[j] * times) * v
        self.settled += times

    def _drain_all(self) -> None:
        for rep in self.replicas.values():
            self._drain(rep)

    # ------------------------------------------------------------------- mixing

    def ready(self, rnd: int, live: Iterable[int]) -> bool:
        """Have all live neighbours' round-`rnd` deltas been applied?"""
        return all(self.replicas[j].synced and self.replicas[j].round >= rnd for j in live if j in self.replicas)

    def waiting_for(self, rnd: int, live: Iterable[int]) -> list[int]:
        return [j for j in live if j in self.replicas and not (self.replicas[j].synced and self.replicas[j].round >= rnd)]

    def mix(self, live: Iterable[int]) -> None:
        """Step 4. Down or unsynced neighbours are left out, i.e. their weight moves to self.

        A replica that lacks this round's delta (the deadline passed) is remembered, and the
        delta's term owed when it comes. Robust rules owe nothing: they are not a sum of pairwise
        terms that cancel, and a debt paid outside the rule would let a late delta bypass it."""
        use = [j for j in live if j in self.replicas and self.replicas[j].synced]
        if self.robust.kind != "off":
            robust_step(self.robust, self.x, self.xhat, [self.replicas[j].xhat for j in use], [self.weights[j] for j in use], self.gamma)
            return
        self.settle()
        for j in use:
            if self.replicas[j].round < self.round:
                self.replicas[j].stale.append(self.round)
        for name in self.x:
            acc = torch.zeros_like(self.x[name])
            for j in use:
                acc += self.weights[j] * (self.replicas[j].xhat[name] - self.xhat[name])
            self.x[name] += self.gamma * acc

    def settle(self) -> None:
        """Add what is owed for rounds mixed without a delta that has come since. Called by a mix
        and at the end of a round, never while the trainer holds the model."""
        if self.owed is not None:
            for name, v in self.owed.items():
                self.x[name] += v
            self.owed = None

    def neighbor_distance(self, live: Iterable[int]) -> float:
        """sqrt(mean_j ||xhat_j - xhat_i||^2) over live, synced neighbours: local disagreement."""
        d2 = [
            sum(float(((self.replicas[j].xhat[k] - self.xhat[k]) ** 2).sum()) for k in self.xhat)
            for j in live
            if j in self.replicas and self.replicas[j].synced
        ]
        return math.sqrt(sum(d2) / len(d2)) if d2 else 0.0

    def _check_layout(self, state: State, what: str) -> None:
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != self.layout:
            raise GossipError(f"{what}: layout {sorted(got.items())[:3]}... differs from the engine's")


def wanted(msg: Message) -> tuple[int, int] | None:
    """The gap a resync request names (`GAP`), None for a plain request of a state."""
    gap = msg.info.get(GAP)
    if gap is None:
        return None
    if not (isinstance(gap, list) and len(gap) == 2 and all(type(v) is int for v in gap) and 0 <= gap[0] < gap[1]):
        raise Refused("resync-gap", f"resync from peer {msg.sender}: info {GAP!r} must be [first, end) with 0 <= first < end, "
                      f"got {gap!r}"[:200])
    return gap[0], gap[1]
