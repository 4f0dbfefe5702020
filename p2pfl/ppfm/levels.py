"""PPFM meta-levels of one peer, sans-IO: fingerprints, cluster model, global model.

Our instantiation of PPFM (Yu et al., MSN 2022), Reptile-style (see ../shared/DESIGN.md):

* task level: phi_i = local steps from the peer's copy theta_c^i of its cluster model;
* cluster level: every member gossips y_i = theta_c^i + beta (phi_i - theta_c^i) with CHOCO on
  its cluster's overlay (`cluster.overlay`), so the members' mean of theta_c moves by
  beta (mean_{i in c} phi_i - theta_c), the Reptile meta step, without a cluster head;
* global level: on every K-th round each cluster's representative gossips its cluster model with
  the other representatives (a second CHOCO engine on the representatives' overlay) and pulls its
  cluster model toward the result, theta_c += lambda_eff (theta_g - theta_c). Only the
  representative moves, and the cluster gossip spreads that move over |c| members, so
  lambda_eff = min(1, lambda |c|) makes the cluster mean move by lambda (theta_g - theta_c).

Each level is its own `ChocoEngine` on its own wire channel. An engine keeps a replica slot for
every peer of the topology but weights only its current overlay neighbours: when clusters change,
a new overlay neighbour's replica is simply out of date, which the engine's sequence numbers
detect and an exact STATE resync repairs, so no engine is ever rebuilt and an in-flight message of
the old overlay is harmless.

Fingerprints are shared-seed SRHT sketches f_i = S d_i of the peer's accumulated task updates,
d_i = sum over rounds of phi_i - theta_c^i (sketches are linear, so the peer just adds each round's
S(phi_i - theta_c^i)); the daemon floods them like consensus sketches and every peer clusters the
same round's set (`ClusterState`), so all agree without a coordinator. Clustering sees them
centred (f_i - mean_j f_j): the direction in which this peer's data moved its model, relative to
where everyone's moved theirs. Two other choices fail (the runs: docs/experiments.md):
* the last few rounds' updates only: once a cluster has converged they are mostly minibatch noise,
  every peer looks alike and the clusters merge back; the accumulated sum keeps the early,
  distinct directions in view;
* the task models themselves (phi_i - x_0, which includes the gossip averaging): their
  differences are dominated by consensus error, which is smooth along the graph, so peers get
  clustered by their position on the graph rather than by their data.
A homogeneous population, whose updates all point the same way up to noise, shows no structure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.core.compress import CompressionPlan
from p2pfl.core.consensus import Sketcher, flatten
from p2pfl.core.gossip import Action, ChocoEngine, GossipError, Refused, State
from p2pfl.core.topology import Topology
from p2pfl.core.wire import CLUSTER, GLOBAL, Message
from p2pfl.ppfm import cluster as C

FINGERPRINT_SEED = 0xF1A6  # mixed into the run seed: fingerprint and consensus sketches differ


@dataclass(frozen=True)
class PpfmConfig:
    """The PPFM knobs of one peer; the defaults and their meaning are `PeerConfig`'s (one place each)."""

    k: C.K = "auto"
    recluster_every: int = PeerConfig.recluster_every  # R, on the global round grid
    global_every: int = PeerConfig.global_every  # K
    lam: float = PeerConfig.global_lambda
    beta: float = PeerConfig.cluster_beta
    margin: float = PeerConfig.cluster_margin
    fingerprint_dim: int = PeerConfig.fingerprint_dim
    lag: int = 2  # a round's fingerprints are clustered this many rounds later (>= flooding time)

    def __post_init__(self) -> None:
        if self.recluster_every < 1 or self.global_every < 1 or self.fingerprint_dim < 1 or self.lag < 0:
            raise ConfigError(f"ppfm: need recluster_every, global_every, fingerprint_dim >= 1 and lag >= 0, got {self}")
        for name in ("lam", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"ppfm: {name} must be in [0, 1], got {getattr(self, name)}")


class Levels:
    """One peer's cluster and global levels: what it trains from, sends, receives and mixes."""

    def __init__(self, me: int, topo: Topology, x0: State, cfg: PpfmConfig, plan: CompressionPlan | str = "none",
                 gamma: float | None = None, seed: int = 0, inc: int = 0) -> None:
        self.me, self.topo, self.cfg = me, topo, cfg
        others = {j: 0.0 for j in topo.ids if j != me}
        self.cluster = ChocoEngine(me, others, x0, plan, gamma, seed=seed, inc=inc)
        self.glob = ChocoEngine(me, others, x0, plan, gamma, seed=seed ^ 0x61, inc=inc)
        self.state = C.ClusterState(k=cfg.k, every=cfg.recluster_every, margin=cfg.margin)
        self.sketcher = Sketcher(flatten(x0).numel(), cfg.fingerprint_dim, seed ^ FINGERPRINT_SEED)
        self._theta: State = self.cluster.x  # the cluster model this round's task step started from
        self.fingerprint = torch.zeros(self.sketcher.k, dtype=torch.float64)  # S d_i, accumulated (k <= the model's size)
        self.labels: dict[int, int] = dict.fromkeys(topo.ids, 0)  # one cluster until the first split
        self.apply(self.labels)

    # ------------------------------------------------------------------ clusters and overlays

    def apply(self, labels: Mapping[int, int]) -> None:
        self.labels = dict(labels)
        ov = C.overlay(self.labels, self.topo.graph)
        c = self.labels[self.me]
        self.members = C.members(self.labels, c)
        self.rep = ov.representatives[c]
        self.cluster_neighbors = sorted(ov.clusters[c].neighbors(self.me))
        self.global_neighbors = sorted(ov.reps.neighbors(self.me)) if self.rep == self.me else []
        for engine, graph, nbrs in ((self.cluster, ov.clusters[c], self.cluster_neighbors),
                                    (self.glob, ov.reps, self.global_neighbors)):
            w = C.mh_weights(graph, self.me) if nbrs else {}
            engine.weights = {j: (w.get(j, 0.0) if j in nbrs else 0.0) for j in engine.replicas}

    def overlay_peers(self) -> set[int]:
        """Every peer this one gossips with on a meta-level (some may not be base-graph neighbours)."""
        return set(self.cluster_neighbors) | set(self.global_neighbors)

    def fingerprint_round(self, rnd: int) -> int | None:
        """The round whose fingerprints a clustering due at `rnd` uses, or None if none is due."""
        src = rnd - self.cfg.lag
        return src if self.state.due(rnd) and src >= 0 and rnd > 0 else None

    def recluster(self, rnd: int, fingerprints: Mapping[int, torch.Tensor]) -> bool:
        """Evaluate the clustering on every peer's fingerprint; True if this peer's overlays changed."""
        missing = sorted(set(self.topo.ids) - set(fingerprints))
        if missing:
            raise C.ClusterError(f"ppfm: fingerprints of peers {missing} missing at round {rnd}")
        ids = sorted(fingerprints)
        rows = torch.stack([fingerprints[p].double().reshape(-1) for p in ids])
        centred = rows - rows.mean(0)
        if not self.state.update(dict(zip(ids, centred, strict=True)), rnd):
            return False
        self.apply(self.state.labels)
        return True

    # ------------------------------------------------------------------ one round

    def model(self) -> State:
        """theta_c^i: this peer's copy of its cluster model, the personalised model."""
        return self.cluster.x

    def global_round(self, rnd: int) -> bool:
        return (rnd + 1) % self.cfg.global_every == 0

    def task_done(self, rnd: int, phi: State) -> tuple[Message, torch.Tensor]:
        """After local steps phi from `model()`: the cluster-level delta and this round's fingerprint."""
        self._theta = self.cluster.x
        self.fingerprint = self.fingerprint + self.sketcher({k: phi[k].to(torch.float32) - v for k, v in self._theta.items()})
        self.cluster.set_x(C.cluster_update(self._theta, phi, self.cfg.beta))
        return _on(self.cluster.make_delta(rnd), CLUSTER), self.fingerprint.clone()

    def global_step(self, rnd: int) -> bool:
        """A representative with other representatives to talk to, on a global round."""
        return bool(self.global_neighbors) and self.global_round(rnd)

    def global_delta(self, rnd: int) -> Message | None:
        """On global rounds, the representative's cluster model theta_c (before this round's task
        step) goes to the other representatives."""
        if not self.global_step(rnd):
            return None
        self.glob.set_x(self._theta)
        return _on(self.glob.make_delta(rnd), GLOBAL)

    def waiting_for(self, rnd: int, live: set[int]) -> list[int]:
        late = self.cluster.waiting_for(rnd, [j for j in self.cluster_neighbors if j in live])
        if self.global_step(rnd):
            late += self.glob.waiting_for(rnd, [j for j in self.global_neighbors if j in live])
        return sorted(set(late))

    def mix(self, rnd: int, live: set[int]) -> None:
        """Cluster gossip step; on global rounds the representative's global step and pull."""
        self.cluster.mix([j for j in self.cluster_neighbors if j in live])
        if self.global_step(rnd):
            self.glob.mix([j for j in self.global_neighbors if j in live])
            lam = min(1.0, self.cfg.lam * len(self.members))
            self.cluster.x = C.global_pull(self.cluster.x, self.glob.x, lam)

    # ------------------------------------------------------------------ messages

    def engine_for(self, channel: str) -> ChocoEngine:
        if channel == CLUSTER:
            return self.cluster
        if channel == GLOBAL:
            return self.glob
        raise GossipError(f"channel: {channel!r} is not a meta-level channel")

    def receive(self, msg: Message) -> list[Action]:
        """Feed a validated cluster- or global-channel message; replies go out on the same channel,
        those of a refusal too (its resync request would otherwise reach the other end's base
        engine, and this level's replica of the sender would never be resynced)."""
        try:
            replies = self.engine_for(msg.channel).receive(msg)
        except Refused as e:
            e.replies = [(dest, _on(reply, msg.channel)) for dest, reply in e.replies]
            raise
        return [(dest, _on(reply, msg.channel)) for dest, reply in replies]

    def control(self, channel: str, make: str) -> Message:
        """A heartbeat or goodbye for overlay peers that are not base-graph neighbours."""
        engine = self.engine_for(channel)
        return _on(engine.heartbeat() if make == "heartbeat" else engine.bye(), channel)


def _on(msg: Message, channel: str) -> Message:
    msg.channel = channel
    return msg


def level_distances(sketches: Mapping[int, torch.Tensor], labels: Mapping[int, int], me: int) -> tuple[float, float]:
    """(cluster-level, global-level) consensus distance from model sketches of one round.

    Cluster level: sqrt(1/|c| sum_{i in c} ||s_i - mean_c s||^2) over this peer's cluster c.
    Global level: the same over the cluster means (each cluster one point): how far the clusters'
    models are apart, which is what the global meta model pulls together.
    """
    c = labels[me]
    mine = [sketches[p] for p in C.members(labels, c) if p in sketches]
    within = _spread(mine)
    means = []
    for g in sorted(set(labels.values())):
        got = [sketches[p] for p in C.members(labels, g) if p in sketches]
        if got:
            means.append(torch.stack(got).mean(0))
    return within, _spread(means)


def _spread(rows: Iterable[torch.Tensor]) -> float:
    rows = list(rows)
    if len(rows) < 2:
        return 0.0
    s = torch.stack(rows).double()
    return float(((s - s.mean(0)) ** 2).sum(1).mean().sqrt())
