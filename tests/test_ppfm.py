"""PPFM meta-levels, sans-IO: wire channels, the level engines, clustering in a simulated network.

Synthetic "training": peer i of planted group g moves its model a step toward the group's target
t_g plus minibatch-like noise, phi = theta + eta (t_g - theta) + noise. A flat average lands
between the targets; clustering should give each peer (nearly) its own group's target.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from p2pfl.config import PeerConfig
from p2pfl.core.gossip import Refused
from p2pfl.core.specs import parse_clusters
from p2pfl.core.topology import PeerSpec, Topology
from p2pfl.core.wire import CLUSTER, GLOBAL, Kind, Message, TensorPayload, WireError, decode, encode
from p2pfl.node import snapshot
from p2pfl.ppfm.levels import Levels, PpfmConfig, level_distances
from p2pfl.sim.simulation import Simulation

D = 2048


def interleaved_ring(n: int, groups: int) -> Topology:
    """A ring whose neighbours are in different planted groups: no cluster has an induced edge."""
    order = [p for g in range(n // groups) for p in range(g, n, n // groups)]
    g = nx.Graph()
    g.add_edges_from(zip(order, order[1:] + order[:1], strict=True))
    return Topology(peers={p: PeerSpec(p, "127.0.0.1", 30000 + p) for p in range(n)}, graph=g, name="interleaved")


def group_of(p: int, n: int, groups: int) -> int:
    return p * groups // n


class FnLearner:
    """A peer whose local steps are a function of (peer, model): synthetic training for the levels."""

    def __init__(self, p: int, fn, x0: torch.Tensor) -> None:
        self.p, self.fn, self.state = p, fn, {"w": x0.clone()}

    def adapter_state(self):
        return {k: v.clone() for k, v in self.state.items()}

    def load_adapter_state(self, state) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    def train_round(self):
        self.state = self.fn(self.p, self.state)
        return {}

    def evaluate(self, global_eval: bool = False):
        return {"accuracy": float("nan"), "global_accuracy": float("nan")}


class PpfmNetwork(Simulation):
    """The daemon's nodes with PPFM on, stepped one round at a time."""

    def __init__(self, topo: Topology, x0: dict[int, torch.Tensor], cfg: PpfmConfig, fn, rounds: int, drop=None) -> None:
        pc = PeerConfig(topology=topo.name, id=0, rounds=rounds, clusters=str(cfg.k), recluster_every=cfg.recluster_every,
                        global_every=cfg.global_every, global_lambda=cfg.lam, cluster_beta=cfg.beta, cluster_margin=cfg.margin,
                        fingerprint_dim=cfg.fingerprint_dim, sketch_dim=0)
        assert cfg.lag == topo.diameter() + 1  # what the node uses
        super().__init__(topo, pc, {p: FnLearner(p, lambda q, theta: fn[0](q, theta), x0[p]) for p in topo.ids}, drop=drop)
        self.fn = fn
        self.levels = {p: nd.mixer.levels for p, nd in self.nodes.items()}

    def step(self, train=None) -> int:  # type: ignore[override]
        if train is not None:
            self.fn[0] = train
        return super().step()

    def labels(self) -> dict[int, dict[int, int]]:
        return {p: dict(lv.labels) for p, lv in self.levels.items()}


def run(topo: Topology, groups: int, rounds: int, cfg: PpfmConfig | None = None, noise: float = 0.3, seed: int = 0):
    n = topo.n
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(D, generator=gen) for _ in range(groups)]

    def train(p: int, theta):
        w = theta["w"]
        return {"w": w + 0.3 * (targets[group_of(p, n, groups)] - w) + noise * torch.randn(D, generator=gen)}

    cfg = cfg or PpfmConfig(lag=topo.diameter() + 1)
    net = PpfmNetwork(topo, {p: torch.zeros(D) for p in topo.ids}, cfg, [train], rounds)
    history = []
    for _ in range(rounds):
        net.step()
        history.append(net.labels())
    return net, targets, history


def error(net: PpfmNetwork, targets, groups: int) -> list[float]:
    n = net.topo.n
    return [float((m["w"] - targets[group_of(p, n, groups)]).norm() / targets[0].norm()) for p, m in net.models().items()]


# ------------------------------------------------------------------ wire channels

def test_channel_travels_and_base_messages_are_unchanged():
    t = {"w": TensorPayload("none", (3,), {"data": torch.ones(3)})}
    base = Message(Kind.DELTA, 2, round=4, seq=1, inc=9, tensors=t)
    assert b"channel" not in bytes(encode(base)[0])  # default channel: the old header exactly
    assert decode(encode(base)).channel == "base"
    for ch in (CLUSTER, GLOBAL):
        msg = Message(Kind.DELTA, 2, round=4, seq=1, inc=9, tensors=t, channel=ch)
        assert decode([bytes(f) for f in encode(msg)]).channel == ch


@pytest.mark.parametrize("bad", ["meta", "", 3, None, ["cluster"]])
def test_unknown_channel_is_rejected_by_name(bad):
    import msgpack

    header = msgpack.unpackb(encode(Message(Kind.HEARTBEAT, 1))[0])
    header["channel"] = bad
    with pytest.raises(WireError, match=r"header\.channel: unknown channel"):
        decode([msgpack.packb(header)])


def test_parse_clusters():
    assert parse_clusters("off") is None
    assert parse_clusters("auto") == "auto"
    assert parse_clusters("3") == 3
    for bad in ("0", "-2", "many", "2.5"):
        with pytest.raises(ValueError, match="--clusters"):
            parse_clusters(bad)


def test_a_refused_level_delta_asks_for_the_state_on_its_own_channel():
    """A peer that rejoins this peer's overlay after more than a window of rounds away (a
    re-clustering) sends a delta too far ahead: the refusal's resync request must travel on the
    level's channel, or the sender's base engine answers it and this replica stays stale."""
    topo = Topology(peers={p: PeerSpec(p, "127.0.0.1", 30000 + p) for p in range(4)}, graph=nx.cycle_graph(4), name="ring-4")
    lv = Levels(0, topo, {"w": torch.zeros(8)}, PpfmConfig(lag=topo.diameter() + 1), "none", None, seed=0, inc=1)
    j = lv.cluster_neighbors[0]

    def delta(seq: int, channel: str) -> Message:
        return Message(Kind.DELTA, j, round=seq, seq=seq, inc=5, channel=channel,
                       tensors={"w": TensorPayload("none", (8,), {"data": torch.zeros(8)})})

    assert lv.receive(delta(0, CLUSTER)) == []  # in sync from its first delta
    with pytest.raises(Refused, match="ahead of the next expected") as e:
        lv.receive(delta(lv.cluster.window + 1, CLUSTER))
    assert e.value.reason == "seq-window"
    assert [(d, m.kind, m.channel) for d, m in e.value.replies] == [(j, Kind.RESYNC, CLUSTER)]


# ------------------------------------------------------------------ the simulated network

def test_planted_groups_are_found_identically_and_personalise():
    topo = interleaved_ring(9, 3)
    net, targets, history = run(topo, 3, 25)
    truth = [group_of(p, 9, 3) for p in range(9)]
    final = history[-1]
    assert all(view == final[0] for view in final.values())  # every peer holds the same clustering
    assert adjusted_rand_score(truth, [final[0][p] for p in range(9)]) >= 0.95
    # Once split, the clustering stays put (hysteresis; accumulated-update fingerprints).
    first = next(r for r, h in enumerate(history) if len(set(h[0].values())) > 1)
    assert all(h[0] == final[0] for h in history[first:])
    # No cluster has a base-graph edge inside it: the overlays added links, and they carried the models.
    lv = net.levels[0]
    assert not set(lv.cluster_neighbors) & set(topo.neighbors(0))
    clustered = error(net, targets, 3)
    flat, _, _ = run(topo, 3, 25, PpfmConfig(k=1, lag=topo.diameter() + 1))
    flat_err = error(flat, targets, 3)
    assert max(clustered) < 0.6 < min(flat_err), (clustered, flat_err)  # flat sits between the targets (~0.8)


def test_a_cluster_link_cut_for_more_than_a_window_resyncs_on_its_channel_and_is_waited_for_again():
    """Peer 2's cluster-channel messages are lost for more than `window` rounds (a partition); when
    they flow again its next delta is too far ahead for its overlay neighbours' replicas. Each
    refuses it once and asks for 2's state on the cluster channel, and from then on no round
    leaves a neighbour out."""
    topo = interleaved_ring(8, 2)
    n, gen = topo.n, torch.Generator().manual_seed(0)
    targets = [torch.randn(D, generator=gen) for _ in range(2)]

    def train(p, theta):
        return {"w": theta["w"] + 0.3 * (targets[group_of(p, n, 2)] - theta["w"]) + 0.3 * torch.randn(D, generator=gen)}

    cut = range(8, 8 + PeerConfig.window + 4)
    net = PpfmNetwork(topo, {p: torch.zeros(D) for p in topo.ids}, PpfmConfig(lag=topo.diameter() + 1), [train], 36,
                      drop=lambda src, dst, msg: src == 2 and msg.channel == CLUSTER and msg.round in cut)
    for _ in range(36):
        net.step()
    assert adjusted_rand_score([group_of(p, n, 2) for p in range(n)], [net.labels()[0][p] for p in range(n)]) == 1.0
    assert sum(recs[-1]["rejected_by_reason"].get("seq-window", 0) for recs in net.records.values()) > 0
    assert any(2 in r["late_neighbors"] for recs in net.records.values() for r in recs if r["round"] in cut)  # the cut bit
    for p, recs in net.records.items():
        late = [(r["round"], r["late_neighbors"]) for r in recs if r["round"] > cut[-1] + 1 and r["late_neighbors"]]
        assert not late, (p, late)


def test_homogeneous_population_is_not_split():
    topo = interleaved_ring(8, 2)
    for seed in range(3):
        _, _, history = run(topo, 1, 25, seed=seed, noise=1.0)
        assert all(set(h[p].values()) == {0} for h in history for p in h), seed


def test_cluster_level_mean_follows_the_reptile_step_exactly():
    """With exact gossip and no global round, the members' mean moves by beta (mean phi - mean theta)."""
    topo = interleaved_ring(6, 2)
    cfg = PpfmConfig(k=2, beta=0.5, global_every=1000, lag=topo.diameter() + 1)
    net = PpfmNetwork(topo, {p: torch.randn(D, generator=torch.Generator().manual_seed(p)) for p in topo.ids}, cfg, [None], 12)
    step = {p: torch.randn(D, generator=torch.Generator().manual_seed(100 + p)) for p in topo.ids}
    for _ in range(12):
        labels = net.levels[0].labels
        before = {p: m["w"].clone() for p, m in net.models().items()}
        phis = {p: before[p] + step[p] for p in topo.ids}
        net.step(lambda p, theta, phis=phis: {"w": phis[p]})
        if net.levels[0].labels != labels:
            continue  # a re-clustering round: overlays (and so the averaging sets) changed
        for c in set(labels.values()):
            ms = [p for p in topo.ids if labels[p] == c]
            want = sum(before[p] + 0.5 * (phis[p] - before[p]) for p in ms) / len(ms)
            got = sum(net.models()[p]["w"] for p in ms) / len(ms)
            assert torch.allclose(got, want, atol=1e-5)
    assert len(set(net.levels[0].labels.values())) == 2


def test_global_level_pulls_clusters_together():
    topo = interleaved_ring(6, 2)
    lag = topo.diameter() + 1
    apart, _, _ = run(topo, 2, 25, PpfmConfig(lam=0.0, lag=lag))
    pulled, _, _ = run(topo, 2, 25, PpfmConfig(lam=0.3, global_every=2, lag=lag))

    def gap(net):
        sk = {p: m["w"] for p, m in net.models().items()}
        return level_distances(sk, net.levels[0].labels, 0)[1]

    assert gap(pulled) < 0.9 * gap(apart)
    assert pulled.channel_bytes.get("global", 0) > 0 and apart.channel_bytes.get("global", 0) > 0


def test_level_distances():
    s = {0: torch.tensor([0.0, 0]), 1: torch.tensor([2.0, 0]), 2: torch.tensor([10.0, 0]), 3: torch.tensor([10.0, 4])}
    within, between = level_distances(s, {0: 0, 1: 0, 2: 1, 3: 1}, 0)
    assert within == pytest.approx(1.0)
    assert between == pytest.approx(float(np.hypot(4.5, 1.0)))  # cluster means (1,0) and (10,2)


# ------------------------------------------------------------------ bad input and state

def test_missing_or_bad_fingerprints_are_refused_by_name():
    topo = interleaved_ring(4, 2)
    lv = Levels(0, topo, {"w": torch.zeros(8)}, PpfmConfig())
    with pytest.raises(ValueError, match=r"fingerprints of peers \[3\] missing"):
        lv.recluster(5, {p: torch.ones(4) for p in range(3)})
    with pytest.raises(ValueError, match="non-finite"):
        lv.recluster(5, {p: torch.tensor([1.0, float("nan") if p == 2 else 0.0]) for p in range(4)})
    with pytest.raises(RuntimeError):  # rows of different lengths cannot be stacked
        lv.recluster(5, {p: torch.ones(4 + (p == 1)) for p in range(4)})


def test_messages_from_outside_the_topology_are_refused():
    from p2pfl.core.gossip import GossipError

    topo = interleaved_ring(4, 2)
    lv = Levels(0, topo, {"w": torch.zeros(8)}, PpfmConfig())
    with pytest.raises(GossipError, match="not a neighbour"):
        lv.receive(Message(Kind.HEARTBEAT, 77, channel=CLUSTER))
    with pytest.raises(GossipError, match="not a meta-level channel"):
        lv.receive(Message(Kind.HEARTBEAT, 1))


def test_levels_checkpoint_round_trip():
    topo = interleaved_ring(6, 2)
    net, _, _ = run(topo, 2, 12)
    lv = net.levels[3]
    tensors, meta = snapshot.levels_state(lv)
    fresh = Levels(3, topo, {"w": torch.zeros(D)}, PpfmConfig(lag=topo.diameter() + 1))
    snapshot.restore_levels(fresh, tensors, meta)
    assert fresh.labels == lv.labels and fresh.cluster_neighbors == lv.cluster_neighbors
    assert torch.equal(fresh.model()["w"], lv.model()["w"])
    assert torch.equal(fresh.glob.x["w"], lv.glob.x["w"])
    for j, rep in lv.cluster.replicas.items():
        assert torch.equal(fresh.cluster.replicas[j].xhat["w"], rep.xhat["w"])
        assert fresh.cluster.replicas[j].next_seq == rep.next_seq
    assert fresh.state.to_dict() == lv.state.to_dict()
    assert torch.equal(fresh.fingerprint, lv.fingerprint)
