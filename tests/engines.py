"""A test harness of bare CHOCO engines: synchronous exact rounds, the real wire codec.

Engine-level tests (gaps, resyncs, codecs, robust mixing) step `ChocoEngine`s directly here;
rounds with deadlines, liveness and training run in `p2pfl.sim.simulation` on the daemon's own nodes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from p2pfl.core.gossip import Action, ChocoEngine, State
from p2pfl.core.topology import Topology
from p2pfl.core.wire import Message, decode, encode, frames_nbytes

DropRule = Callable[[int, int, Message], bool]  # (src, dst, msg) -> drop it?


class SimNetwork:
    def __init__(self, topo: Topology, states: dict[int, State], plan: str = "none", gamma: float | None = None, seed: int = 0) -> None:
        self.topo = topo
        self.engines: dict[int, ChocoEngine] = {}
        for p in topo.ids:
            w = topo.mh_weights(p)
            w.pop(p)
            self.engines[p] = ChocoEngine(p, w, states[p], plan, gamma, seed=seed, inc=1000 + p)
        self.round = -1
        self.bytes_sent = 0
        self.messages = 0
        self.dropped = 0
        # Peers meet before the first round, as the daemon's startup hellos do; otherwise each
        # first delta would be a first contact after our own first delta, answered by a full STATE.
        for p in topo.ids:
            hello = self.engines[p].hello()
            for j in topo.neighbors(p):
                self.deliver(p, j, hello)

    def deliver(self, src: int, dst: int, msg: Message, drop: DropRule | None = None) -> None:
        """Wire-encode, (maybe) drop, decode and hand to dst; replies are delivered recursively."""
        if drop is not None and drop(src, dst, msg):
            self.dropped += 1
            return
        frames = [bytes(f) for f in encode(msg)]
        self.bytes_sent += frames_nbytes(frames)
        self.messages += 1
        replies: list[Action] = self.engines[dst].receive(decode(frames))
        for to, reply in replies:
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

    def flat(self) -> torch.Tensor:
        return torch.stack([torch.cat([e.x[k].reshape(-1) for k in sorted(e.x)]).double() for e in self.engines.values()])
