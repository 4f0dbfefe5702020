"""A discrete-event simulator of many peers: the real `node.Node` state machines, wire encoding and
trainers, a virtual clock instead of sockets and sleeps.

The benches and the round-level tests drive the daemon's own rounds here, with every message
encoded to frames and decoded again (byte counts are the wire's). Messages arrive `latency`
virtual seconds after they are sent, work takes no virtual time, so rounds are as synchronous as
on an idle network; `drop` loses chosen messages to exercise resyncs and deadlines.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from p2pfl.config import PeerConfig
from p2pfl.core.consensus import flatten
from p2pfl.core.gossip import State
from p2pfl.core.membership.messages import ViewConfig
from p2pfl.core.state import synthetic_state
from p2pfl.core.topology import Topology
from p2pfl.core.wire import Message, encode, frames_nbytes
from p2pfl.errors import P2pflError
from p2pfl.node import actions as A
from p2pfl.node import node as N
from p2pfl.node.build import make_node, make_open_node
from p2pfl.node.work import Learner, learner_spec, perform

DropRule = Callable[[int, int, Message], bool]  # (src, dst, msg) -> drop it?
Latency = Callable[[int, int, Message], float]  # (src, dst, msg) -> virtual seconds on the way


class SimulationError(P2pflError, RuntimeError):
    """A simulated node hit an error it survived, which a test of the protocol must not pass over."""


@dataclass
class OpenNet:
    """An open network in the simulator: peers `ids`, each joining through `contact` at its start
    time (`Simulation(starts=...)`), some leaving (SIGTERM: a goodbye after the round) or
    crashing (silence) at given virtual times."""

    ids: list[int]
    contact: int = 0
    views: ViewConfig | None = None
    leaves: dict[int, float] = field(default_factory=dict)
    crashes: dict[int, float] = field(default_factory=dict)
    net: int = 1
    size: tuple[int, int] = (64, 16)  # the size estimator's K and epoch (rounds)


class Simulation:
    def __init__(self, topo: Topology | OpenNet, cfg: PeerConfig, learners: dict[int, Learner] | None = None,
                 states: dict[int, State] | None = None, latency: float | Latency = 1e-3, drop: DropRule | None = None,
                 teachers: bool = False, per_peer: dict[int, dict[str, Any]] | None = None,
                 starts: dict[int, float] | None = None, internal_errors_ok: bool = False) -> None:
        """`learners` train and evaluate (a peer without one gossips `states[p]` or its synthetic
        `--no-train` state); `teachers`: hand neighbours' replicas to the learners (augmentation);
        `per_peer`: settings of single peers over `cfg` (e.g. one `byzantine` peer); `starts`:
        when single peers start (else at 0); what is sent to one before then arrives when it
        starts, as a DEALER holds messages for a peer that is not listening yet. `latency` may
        differ per link and message; a link keeps its order, as a TCP connection does. With an
        `OpenNet` the peers are those of an open network (`build.make_open_node`)."""
        self.topo, self.latency, self.drop = topo, latency, drop
        self.learners = learners or {}
        self.nodes: dict[int, N.Node] = {}
        for p in topo.ids:
            pc = replace(cfg, id=p, **(per_peer or {}).get(p, {}))
            lr = self.learners.get(p)
            x0 = lr.adapter_state() if lr is not None else (states or {}).get(p) or synthetic_state(cfg.seed, p, cfg.dim)
            spec = N.NodeSpec(x0=x0, inc=1000 + p, train=lr is not None, augment=teachers and lr is not None,
                              eval_every=learner_spec(lr)["eval_every"])
            log = logging.getLogger(f"p2pfl.sim.{p}")
            if isinstance(topo, OpenNet):
                contact = None if p == topo.contact else topo.contact
                self.nodes[p] = make_open_node(pc, contact, spec, topo.net, topo.views, size=topo.size, log=log)
            else:
                self.nodes[p] = make_node(pc, topo, spec, log)
        self.internal_errors_ok = internal_errors_ok
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], list[A.Action]], int]] = []
        self._seq = itertools.count()
        self._timers: dict[int, float] = {}
        self._held: dict[int, A.Train] = {}  # training of a round past the one `step` runs to
        self._until: int | None = None
        self.records: dict[int, list[dict[str, Any]]] = {p: [] for p in topo.ids}
        self.bytes_sent: dict[int, int] = dict.fromkeys(topo.ids, 0)
        self.channel_bytes: dict[str, int] = {}  # by gossip level: base, cluster, global
        self.messages = self.dropped = 0
        self._arrival: dict[tuple[int, int], float] = {}  # each link's last arrival time
        self.codes: dict[int, int] = {}
        self.starts = {p: (starts or {}).get(p, 0.0) for p in topo.ids}
        for p, nd in self.nodes.items():
            self._at(self.starts[p], p, lambda nd=nd: nd.start(self.now))
        self.crashed: set[int] = set()
        if isinstance(topo, OpenNet):
            for p, t in topo.leaves.items():
                self._at(t, p, lambda nd=self.nodes[p]: (nd.stop(), nd.tick(self.now))[1])
            for p, t in topo.crashes.items():
                self._at(t, p, lambda p=p: self._crash(p))

    def _crash(self, p: int) -> list[A.Action]:
        """Peer `p` stops dead: nothing more from it or to it."""
        self.crashed.add(p)
        self.codes[p] = -9
        return []

    def _at(self, t: float, p: int, event: Callable[[], list[A.Action]]) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), event, p))

    def _run(self, p: int, actions: list[A.Action]) -> None:
        nd = self.nodes[p]
        for a in actions:
            if isinstance(a, A.Send):
                self._send(p, a)
            elif isinstance(a, A.Train | A.Evaluate):
                if isinstance(a, A.Train) and self._until is not None and a.round > self._until:
                    self._held[p] = a
                else:
                    self._work(p, a)
            elif isinstance(a, A.Record):
                a.record["time"] = a.record.pop("at", self.now)  # virtual seconds
                self.records[p].append(a.record)
            elif isinstance(a, A.Finish):
                self.codes[p] = a.code
        wake = nd.next_wakeup()
        if wake != float("inf") and self._timers.get(p) != wake:
            self._timers[p] = wake
            self._at(wake, p, lambda: self._tick(p, wake))

    def _tick(self, p: int, wake: float) -> list[A.Action]:
        if self._timers.get(p) != wake:
            return []  # superseded by a later timer
        del self._timers[p]
        return self.nodes[p].tick(self.now)

    def _send(self, src: int, a: A.Send) -> None:
        if self.drop is not None and self.drop(src, a.dest, a.msg):
            self.dropped += 1
            return
        frames = [bytes(f) for f in encode(a.msg)]
        n = frames_nbytes(frames)
        self.bytes_sent[src] += n
        self.channel_bytes[a.msg.channel] = self.channel_bytes.get(a.msg.channel, 0) + n
        self.messages += 1
        dst = self.nodes[a.dest]
        lat = self.latency(src, a.dest, a.msg) if callable(self.latency) else self.latency
        at = self._arrival[src, a.dest] = max(self.now + lat, self.starts[a.dest], self._arrival.get((src, a.dest), 0.0))
        self._at(at, a.dest, lambda: [] if dst.finished else dst.receive(frames, src, self.now))

    def _work(self, p: int, a: A.Train | A.Evaluate) -> None:
        metrics, state = perform(self.learners[p], a, self.nodes[p].spec.augment, lambda: self.now)
        nd = self.nodes[p]
        if isinstance(a, A.Train):
            self._at(self.now, p, lambda: nd.trained(metrics, state, self.now))
        else:
            self._at(self.now, p, lambda: nd.evaluated(metrics, self.now))

    def _process(self, stop: Callable[[], bool]) -> None:
        while self._queue and not stop():
            t, _, event, p = heapq.heappop(self._queue)
            self.now = max(self.now, t)
            if p in self.crashed:
                continue
            self._run(p, event())
            if self.nodes[p].intake.internal_errors and not self.internal_errors_ok:
                raise SimulationError(f"peer {p}: {self.nodes[p].intake.internal_errors} internal error(s) at t={self.now:.3f} (see its log)")

    def run(self) -> dict[int, list[dict[str, Any]]]:
        """Every peer's rounds to the end (drain rounds included); the records by peer."""
        self._until = None
        for p, a in self._held.items():
            self._work(p, a)
        self._held.clear()
        self._process(lambda: len(self.codes) == len(self.nodes))
        return self.records

    def step(self) -> int:
        """Run until every training peer has mixed one more round; returns that round."""
        target = 0 if self._until is None else self._until + 1
        self._until = target
        for p, a in list(self._held.items()):
            if a.round <= target:
                del self._held[p]
                self._work(p, a)
        self._process(lambda: all(nd.finished or nd.rnd > target or p in self.crashed for p, nd in self.nodes.items()))
        return target

    def advance(self, until: float) -> None:
        """Run every event up to virtual time `until`."""
        self._process(lambda: self._queue[0][0] > until)
        self.now = max(self.now, until)

    def models(self) -> dict[int, State]:
        return {p: nd.model() for p, nd in self.nodes.items()}

    def flat(self) -> Any:
        import torch

        return torch.stack([flatten(m).double() for m in self.models().values()])


def train_network(topo: Topology, learners: dict[int, Learner], rounds: int, teachers: bool = False, **settings: Any) -> Simulation:
    """`rounds` daemon rounds of `learners` on `topo` (settings: any `PeerConfig` field, e.g.
    compress, clusters); returns the finished simulation (records, bytes, final models)."""
    from pathlib import Path

    cfg = PeerConfig(topology=Path(topo.name), id=topo.ids[0], rounds=rounds, **settings)
    sim = Simulation(topo, cfg, learners, teachers=teachers)
    sim.run()
    return sim
