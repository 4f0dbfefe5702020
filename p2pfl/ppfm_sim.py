"""In-process network of PPFM peers: the real `ppfm.Levels`, engines, wire encoding and flooding.

What the daemon does per round, minus sockets and clocks (tests, `bench/ppfm.py`): every peer
clusters the fingerprints its own `SketchBook` holds, trains from its cluster model, sends its
cluster-level delta (and, on global rounds, its global-level delta) to its overlay neighbours,
floods fingerprints to its base-graph neighbours, and mixes. Every message is encoded to frames
and decoded again, so byte counts are the wire's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from p2pfl.consensus import SketchBook
from p2pfl.gossip import State
from p2pfl.ppfm import Levels, PpfmConfig
from p2pfl.sim import SimNetwork
from p2pfl.topology import Topology
from p2pfl.wire import BASE, Kind, Message, TensorPayload, decode, encode, frames_nbytes

Train = Callable[[int, State], State]  # (peer, start model) -> task model after local steps


class Learner(Protocol):
    """What the baseline needs of a `trainer.Trainer`."""

    def train_round(self) -> dict[str, float]: ...
    def adapter_state(self) -> State: ...
    def load_adapter_state(self, state: State) -> None: ...
FINGERPRINTS = "_fingerprints"


class PpfmNetwork:
    def __init__(self, topo: Topology, states: dict[int, State], cfg: PpfmConfig, plan: str = "none", seed: int = 0) -> None:
        self.topo = topo
        self.levels = {p: Levels(p, topo, states[p], cfg, plan, seed=seed, inc=1000 + p) for p in topo.ids}
        self.books = {p: SketchBook(p, topo.ids, horizon=topo.diameter() + 2) for p in topo.ids}
        self.round = -1
        self.bytes_sent: dict[str, int] = {}

    def _count(self, channel: str, frames: list) -> None:
        self.bytes_sent[channel] = self.bytes_sent.get(channel, 0) + frames_nbytes(frames)

    def deliver(self, src: int, dst: int, msg: Message) -> None:
        frames = [bytes(f) for f in encode(msg)]
        self._count(msg.channel, frames)
        for to, reply in self.levels[dst].receive(decode(frames)):
            self.deliver(dst, to, reply)

    def _flood(self, rnd: int) -> None:
        """One hop of fingerprint flooding on the base graph (what rides on base-channel deltas)."""
        outgoing = {(p, j): self.books[p].outgoing(j, rnd) for p in self.topo.ids for j in self.topo.neighbors(p)}
        for (p, j), out in outgoing.items():
            if not out:
                continue
            data = torch.stack([s for _, _, s in out])
            msg = Message(Kind.DELTA, p, rnd, channel=BASE, info={"fingerprints": [[o, r] for o, r, _ in out]},
                          tensors={FINGERPRINTS: TensorPayload("none", tuple(data.shape), {"data": data})})
            frames = [bytes(f) for f in encode(msg)]
            self._count("fingerprints", frames)
            got = decode(frames)
            for (origin, r), row in zip(got.info["fingerprints"], got.tensors[FINGERPRINTS].parts["data"], strict=True):
                self.books[j].add(origin, r, row.clone(), via=p)

    def step(self, train: Train) -> None:
        rnd = self.round = self.round + 1
        for p, lv in self.levels.items():
            src = lv.fingerprint_round(rnd)
            if src is not None and self.books[p].complete(src):
                lv.recluster(rnd, {q: self.books[p].entries[(q, src)] for q in self.topo.ids})
        deltas = {}
        for p, lv in self.levels.items():
            msg, fp = lv.task_done(rnd, train(p, lv.model()))
            self.books[p].add(p, rnd, fp)
            deltas[p] = (msg, lv.global_delta(rnd))
        for p, (cmsg, gmsg) in deltas.items():
            for j in self.levels[p].cluster_neighbors:
                self.deliver(p, j, cmsg)
            for j in self.levels[p].global_neighbors if gmsg is not None else []:
                self.deliver(p, j, gmsg)
        self._flood(rnd)
        everyone = set(self.topo.ids)
        for lv in self.levels.values():
            lv.mix(rnd, everyone)
        for book in self.books.values():
            book.prune(rnd - self.topo.diameter() - 4)

    def labels(self) -> dict[int, dict[int, int]]:
        """Each peer's view of the clustering."""
        return {p: dict(lv.labels) for p, lv in self.levels.items()}

    def models(self) -> dict[int, State]:
        return {p: lv.model() for p, lv in self.levels.items()}


def flat_gossip(topo: Topology, learners: dict[int, Learner], rounds: int) -> SimNetwork:
    """The baseline PPFM is compared with: local steps, then one exact CHOCO step on the base graph
    per round (what the daemon does with --clusters off). Learners end holding their mixed models."""
    net = SimNetwork(topo, {p: t.adapter_state() for p, t in learners.items()})
    for _ in range(rounds):
        for p, t in learners.items():
            t.train_round()
            net.engines[p].set_x(t.adapter_state())
        net.step()
        for p, t in learners.items():
            t.load_adapter_state(net.engines[p].x)
    return net
