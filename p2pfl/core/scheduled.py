"""Gossip on a time-varying schedule (`p2pfl.core.schedule`): what a peer sends in round t and to whom,
whom it waits for and how it mixes. Pure, like `p2pfl.core.gossip`; the node drives it.

Two exchanges, by whether a schedule's edges come back:

- **Recurring edges** (one-peer exponential): CHOCO with one public copy per directed edge. Peer i
  keeps, for each edge class k = t mod tau, its copy xhat_i^(k) of the edge to i + 2^k and a
  replica of xhat_{i-2^k}^(k); in round t only class k moves and travels:
      q = Q(x_i - xhat_i^(k));  xhat_i^(k) += q;  send q to i + 2^k
      x_i += gamma * w (xhat_{i-2^k}^(k) - xhat_i^(k))
  Both ends keep an edge's copy bit-identical (the engine's sequence numbers and resyncs, per edge).
  Every peer mixes against its own copy of the class it sends, so the sum over peers of the
  updates is zero (the matrix is doubly stochastic) and the network mean stays where it is; each
  copy moves every tau rounds, so every contracting codec still reaches consensus.
- **Fresh edges** (random-regular, epidemic): an edge seldom comes back, so a replica would be
  stale by its next use. The whole model travels, exact or as fp16/bf16, as decentralizepy's
  dynamic samplers send it. Doubly stochastic schedules mix x_i += sum_j w_ij (Q(x_j) - Q(x_i)),
  which keeps the mean whatever the codec; epidemic mixes with push-sum weights omega,
      x_i <- (a omega_i x_i + sum_j a omega_j Q(x_j)) / omega_i',  omega_i' = a (omega_i + sum_j omega_j),
  a = 1/(S + 1), which conserves sum_i omega_i x_i.

A round-t sender that has not delivered when the node stops waiting is left out of that round:
its weight stays with the receiver.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from p2pfl.core.compress import CompressionPlan
from p2pfl.core.gossip import (
    Action,
    ChocoEngine,
    GossipError,
    Refused,
    Replica,
    RoundStats,
    State,
    wanted,
    zeros_like_state,
)
from p2pfl.core.schedule import Schedule
from p2pfl.core.specs import check_schedule_codecs
from p2pfl.core.wire import Kind, Message

MIN_WEIGHT = 1e-300  # a push-sum weight stays positive (receivers refuse 0) after ~500 rounds alone


class EdgeEngine(ChocoEngine):
    """CHOCO on one directed edge class: this peer's public copy for the edge to `dest` and its
    replica of `src`'s copy for the edge into this peer. `src` sends deltas and states; `dest`
    asks for our state. The model `x` is the node's, shared by every class (set before use)."""

    answers_contact = False

    def __init__(self, me: int, src: int, dest: int, weight: float, x: State, plan: CompressionPlan,
                 gamma: float | None, seed: int, inc: int, norm_factor: float, window: int) -> None:
        super().__init__(me, {src: weight}, x, plan, gamma, seed=seed, inc=inc, norm_factor=norm_factor, window=window)
        self.x = x
        self.src, self.dest = src, dest
        self.asker = Replica(xhat={})  # dest's full-state requests, rate-limited like a neighbour's

    def receive(self, msg: Message) -> list[Action]:
        if msg.kind == Kind.RESYNC:
            if msg.sender != self.dest:
                raise GossipError(f"peer {msg.sender}: asks for the copy of this peer's edge to peer {self.dest}")
            return self._give_state(self.dest, self.asker, wanted(msg))
        return super().receive(msg)

    def take_owed(self) -> list[Action]:
        if self.asker.state_owed and self.asker.state_round != self.round:
            return self._give_state(self.dest, self.asker, self.asker.owed_gap)
        return []


class EdgeGossip:
    """A recurring schedule's exchange: one `EdgeEngine` per edge class."""

    def __init__(self, me: int, schedule: Schedule, x: State, plan: CompressionPlan, gamma: float | None, seed: int,
                 inc: int, norm_factor: float, window: int) -> None:
        self.me = me
        self.engines: list[EdgeEngine] = []
        for k in range(schedule.period):
            g = schedule.graph(k)
            (src,), (dest,) = g.inn[me], g.out[me]
            # A delta may run a whole period ahead of this class's last round.
            self.engines.append(EdgeEngine(me, src, dest, g.weights[me][src], x, plan, gamma, seed * 131 + k, inc,
                                           norm_factor, window + schedule.period))
        self.by_src = {e.src: e for e in self.engines}
        self.by_dest = {e.dest: e for e in self.engines}
        self.active = self.engines[0]
        self.mixed: list[int] = []

    def engine(self, rnd: int) -> EdgeEngine:
        return self.engines[rnd % len(self.engines)]

    def outgoing(self, rnd: int, x: State, empty: bool) -> list[Action]:
        eng = self.active = self.engine(rnd)
        eng.x = x
        return [(eng.dest, eng.make_delta(rnd, empty))]

    def receive(self, msg: Message) -> list[Action]:
        resync = msg.kind == Kind.RESYNC
        eng = (self.by_dest if resync else self.by_src).get(msg.sender)
        if eng is None:
            raise GossipError(f"peer {msg.sender}: no edge of this schedule runs {'to' if resync else 'from'} it")
        return eng.receive(msg)

    def waiting_for(self, rnd: int, skip: set[int]) -> list[int]:
        eng = self.engine(rnd)
        return [] if eng.src in skip else eng.waiting_for(rnd, [eng.src])

    def mix(self, rnd: int, x: State, exclude: set[int]) -> None:
        eng = self.engine(rnd)
        eng.x = x
        self.mixed = [eng.src] if eng.src not in exclude and eng.ready(rnd, [eng.src]) else []
        eng.mix(self.mixed)

    def end_round(self, rnd: int) -> None:
        """Nothing to let go of: a late delta still applies to its edge's replica, in order."""

    def links(self, rnd: int) -> set[int]:
        return {e.dest for e in self.engines}  # they all come back

    def take_owed(self) -> list[Action]:
        return [a for e in self.engines for a in e.take_owed() + e.overdue()]

    def forget(self, peer: int) -> list[Action]:
        eng = self.by_src.get(peer)
        return [eng.forget(peer)] if eng is not None else []

    def neighbor_distance(self, live: Iterable[int] = ()) -> float:
        return self.active.neighbor_distance(self.mixed)

    @property
    def last_stats(self) -> RoundStats:
        return self.active.last_stats

    @property
    def duplicates(self) -> int:
        return sum(e.duplicates for e in self.engines)


class FullGossip:
    """A schedule with fresh edges: whole models to round t's receivers, mixed on arrival's round."""

    def __init__(self, me: int, schedule: Schedule, x: State, plan: CompressionPlan, seed: int, inc: int, window: int) -> None:
        self.me, self.schedule, self.window = me, schedule, window
        self.codec = ChocoEngine(me, {}, x, plan, gamma=1.0, seed=seed, inc=inc)  # encodes and decodes whole models
        self.weight = self.prior_weight = 1.0  # push-sum weight omega_i after and before the last mix; 1 if doubly stochastic
        self.got: dict[int, dict[int, tuple[State | None, float]]] = {}  # round -> sender -> (decoded model, its omega)
        self.inc_of: dict[int, int] = {}
        self.own: State = {}  # Q(x_i), what this round's receivers decode
        self.sent = self.done = -1  # the last round sent, the last round finished
        self.mixed: list[int] = []
        self.duplicates = self.late = 0
        self._distance = 0.0

    def outgoing(self, rnd: int, x: State, empty: bool) -> list[Action]:
        c = self.codec
        c.x, c.xhat = x, zeros_like_state(x)
        msg = c.make_delta(rnd, empty)
        self.own, self.sent = c.xhat, rnd
        msg.kind = Kind.STATE
        if self.schedule.push_sum:
            msg.info["weight"] = self.weight
        return [(j, msg) for j in self.schedule.graph(rnd).out[self.me]]

    def receive(self, msg: Message) -> list[Action]:
        s, rnd = msg.sender, msg.round
        if msg.kind != Kind.STATE:
            raise GossipError(f"{msg.kind.value} from peer {s}: peers of a {self.schedule.spec} schedule send whole models")
        if msg.inc < self.inc_of.get(s, 0):
            raise GossipError(f"peer {s}: stale incarnation {msg.inc} < {self.inc_of[s]} (replayed or old message)")
        self.inc_of[s] = msg.inc
        if rnd <= self.done:
            self.late += 1  # that round is mixed; a whole model is not worth keeping for later
            return []
        ref = max(self.done, self.sent)
        if rnd > ref + self.window:
            raise Refused("round-window", f"model of round {rnd} from peer {s}: more than {self.window} rounds past round {ref}")
        if s not in self.schedule.graph(rnd).inn[self.me]:
            raise GossipError(f"peer {s}: does not send to peer {self.me} in round {rnd} of {self.schedule.spec}")
        box = self.got.setdefault(rnd, {})
        if s in box:
            self.duplicates += 1
            return []
        weight = msg.info.get("weight", 1.0) if self.schedule.push_sum else 1.0
        if not (isinstance(weight, float) and 0.0 < weight <= self.schedule.n):
            raise GossipError(f"peer {s}: push-sum weight {weight!r} is not in (0, {self.schedule.n}]")
        box[s] = (self.codec._decode(msg) if msg.tensors else None, weight)
        return []

    def waiting_for(self, rnd: int, skip: set[int]) -> list[int]:
        box = self.got.get(rnd, {})
        return [j for j in self.schedule.graph(rnd).inn[self.me] if j not in box and j not in skip]

    def mix(self, rnd: int, x: State, exclude: set[int]) -> None:
        row = self.schedule.graph(rnd).weights[self.me]
        have = {j: v for j, v in self.got.get(rnd, {}).items() if j not in exclude and v[0] is not None}
        self.mixed = sorted(have)
        d2 = [sum(float(((m[k] - self.own[k]) ** 2).sum()) for k in m) for m, _ in have.values()]
        self._distance = math.sqrt(sum(d2) / len(d2)) if d2 else 0.0
        if not self.schedule.push_sum:
            for name, v in x.items():
                acc = torch.zeros_like(v)
                for j, (m, _) in have.items():
                    acc += row[j] * (m[name] - self.own[name])
                v += acc
            return
        # The coefficients are normalised in float64 before they touch the float32 tensors: a peer
        # that mixes alone divides its weight by S + 1 every round, and after a few dozen such
        # rounds (a restart behind the network) a weight times a tensor underflows float32, which
        # first blurs x and then turns it into 0/0.
        mass = row[self.me] * self.weight + math.fsum(row[j] * w for j, (_, w) in have.items())
        own = row[self.me] * self.weight / mass  # mass > 0: the weight keeps its floor
        for name, v in x.items():
            acc = own * v
            for j, (m, w) in have.items():
                acc += (row[j] * w / mass) * m[name]
            v.copy_(acc)
        self.prior_weight, self.weight = self.weight, max(mass, MIN_WEIGHT)

    def end_round(self, rnd: int) -> None:
        self.done = rnd
        for r in [r for r in self.got if r <= rnd]:
            del self.got[r]

    def links(self, rnd: int) -> set[int]:
        return set(self.schedule.graph(rnd).out[self.me]) if rnd >= 0 else set()

    def take_owed(self) -> list[Action]:
        return []

    def forget(self, peer: int) -> list[Action]:
        return []

    def neighbor_distance(self, live: Iterable[int] = ()) -> float:
        return self._distance

    @property
    def last_stats(self) -> RoundStats:
        return self.codec.last_stats


def scheduled_gossip(me: int, schedule: Schedule, x: State, plan: CompressionPlan | str, gamma: float | None, seed: int,
                     inc: int, norm_factor: float, window: int) -> EdgeGossip | FullGossip:
    """The exchange a schedule allows: per-edge CHOCO where edges recur, whole models elsewhere
    (refusing codecs whose error only CHOCO's replicas would correct)."""
    plan = CompressionPlan.parse(plan) if isinstance(plan, str) else plan
    check_schedule_codecs(plan, str(schedule.spec), schedule.recurring)
    if schedule.recurring:
        return EdgeGossip(me, schedule, x, plan, gamma, seed, inc, norm_factor, window)
    return FullGossip(me, schedule, x, plan, seed, inc, window)
