"""Bare engines in synchronous exact rounds, no node around them: the harness that engine-level
tests and benches share (gaps, resyncs, codecs, robust mixing, bytes to consensus, the consensus
estimator's error). Rounds with deadlines, liveness and training run in `p2pfl.sim.simulation`
on the daemon's own nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from p2pfl.core.estimate import EstimatorConfig, GossipEstimator
from p2pfl.core.gossip import ChocoEngine, State
from p2pfl.core.topology import Topology
from p2pfl.core.wire import Message, decode, encode, frames_nbytes

DropRule = Callable[[int, int, Message], bool]  # (src, dst, msg) -> drop it?


class EngineNetwork:
    """One `ChocoEngine` per peer of `topo`, Metropolis-Hastings weights, stepped a round at a time.

    Every message is wire-encoded and decoded on its way, as between processes, unless `wire` is
    false (many-round convergence tests, where the codec path is tested elsewhere). `engine` goes to
    every `ChocoEngine` (robust rule, norm guard, window). `bytes_sent` and `messages` count the
    rounds' traffic, replies included; `replies` counts the answers (resyncs, states) alone."""

    def __init__(self, topo: Topology, states: Mapping[int, State], plan: str = "none", gamma: float | None = None,
                 seed: int = 0, wire: bool = True, **engine: Any) -> None:
        self.topo = topo
        self.wire = wire
        self.engines: dict[int, ChocoEngine] = {}
        for p in topo.ids:
            w = topo.mh_weights(p)
            w.pop(p)
            self.engines[p] = ChocoEngine(p, w, states[p], plan, gamma, seed=seed, inc=1, **engine)
        self.round = -1
        self.bytes_sent = self.messages = self.replies = self.dropped = 0
        # Peers meet before the first round, as the daemon's startup hellos do; otherwise each
        # first delta would be a first contact after our own first delta, answered by a full STATE.
        for p in topo.ids:
            hello = self.engines[p].hello()
            for j in topo.neighbors(p):
                self.deliver(p, j, hello)
        self.bytes_sent = self.messages = self.replies = 0  # the rounds' traffic only

    def deliver(self, src: int, dst: int, msg: Message, drop: DropRule | None = None) -> None:
        """(Maybe) drop, wire-encode and decode, and hand to dst; replies are delivered recursively."""
        if drop is not None and drop(src, dst, msg):
            self.dropped += 1
            return
        self.messages += 1
        if self.wire:
            frames = [bytes(f) for f in encode(msg)]
            self.bytes_sent += frames_nbytes(frames)
            msg = decode(frames)
        for to, reply in self.engines[dst].receive(msg):
            self.replies += 1
            self.deliver(dst, to, reply, drop)

    def step(self, live: set[int] | None = None, drop: DropRule | None = None, mix: bool = True) -> None:
        """One synchronous round: every live engine sends its delta, then every live engine mixes."""
        live = set(self.topo.ids) if live is None else live
        self.round += 1
        deltas = {p: self.engines[p].make_delta(self.round) for p in sorted(live)}
        for p, msg in deltas.items():
            for j in self.topo.neighbors(p):
                if j in live:
                    self.deliver(p, j, msg, drop)
        if mix:
            for p in sorted(live):
                self.engines[p].mix([j for j in self.topo.neighbors(p) if j in live])

    def states(self) -> dict[int, State]:
        return {p: e.x for p, e in self.engines.items()}

    def stale_replicas(self) -> list[tuple[int, int]]:
        """(holder, owner) of every replica that is not bit-identical to what its owner holds: CHOCO
        mixes correctly only while this is empty."""
        return [(j, p) for p, e in self.engines.items() for j in self.topo.neighbors(p)
                if any(not torch.equal(self.engines[j].replicas[p].xhat[k], e.xhat[k]) for k in e.xhat)]

    def flat(self) -> torch.Tensor:
        """Every peer's model as one float64 row."""
        return torch.stack([torch.cat([e.x[k].reshape(-1) for k in sorted(e.x)]).double() for e in self.engines.values()])


def run_estimators(
    rows: Mapping[int, Mapping[int, float]],
    cfg: EstimatorConfig,
    sketch: Callable[[int, int], torch.Tensor],
    rounds: int,
    *,
    down: Callable[[int, int], bool] | None = None,
    drop: Callable[[int, int, int], bool] | None = None,
    observe: Callable[[int, dict[int, GossipEstimator]], None] | None = None,
    on_send: Callable[[int, int, list[list[int]], torch.Tensor], None] | None = None,
) -> tuple[dict[int, list[tuple[int, float]]], dict[int, GossipEstimator]]:
    """Synchronous rounds of one `GossipEstimator` per peer, in the order a node calls them.

    rows: each peer's weights (neighbours; a self entry is ignored).  sketch(peer, rnd): its sketch on
    an instance round.  down(peer, rnd): the peer is off that round (sends nothing, does not mix).
    drop(sender, receiver, rnd): that one message is lost.  observe(rnd, estimators) after each mix;
    on_send(rnd, peer, keys, data) for each payload a peer sends.
    Returns (each peer's ready() results in order, the estimators)."""
    ests = {i: GossipEstimator(i, {j: w for j, w in row.items() if j != i}, cfg) for i, row in rows.items()}
    out: dict[int, list[tuple[int, float]]] = {i: [] for i in ests}
    for rnd in range(rounds):
        up = [i for i in ests if down is None or not down(i, rnd)]
        upset = set(up)
        for i in up:
            if ests[i].starts(rnd):
                ests[i].add_own(rnd, sketch(i, rnd))
        sent = {i: ests[i].payload(rnd) for i in up}
        if on_send is not None:
            for i in up:
                on_send(rnd, i, *sent[i])
        for i in up:
            for j in ests[i].weights:
                if j in upset and (drop is None or not drop(j, i, rnd)):
                    ests[i].receive(j, rnd, *sent[j])
        for i in up:
            ests[i].mix(rnd, [j for j in ests[i].weights if j in upset])
            out[i].extend(ests[i].ready())
        if observe is not None:
            observe(rnd, ests)
    return out, ests
