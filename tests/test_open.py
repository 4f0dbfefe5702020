"""An open network's peers (`node.membership`: HyParView's active view as the neighbourhood, CHOCO
on it) in the simulator, the daemon's node on a virtual clock: 32 peers that know only peer 0 join,
mix exactly, estimate the network's size; and churn: joins, goodbyes and crashes mid-run."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import torch

from p2pfl.config import PeerConfig
from p2pfl.core.consensus import flatten
from p2pfl.core.membership.size import relative_std
from p2pfl.node.membership import NO_ESTIMATE
from p2pfl.sim.simulation import OpenNet, Simulation

N = 32


def cfg(**kw) -> PeerConfig:
    return PeerConfig(**{"topology": Path("open"), "id": 0, "no_train": True, "dim": 64, "sketch_dim": 0, "compress": "none",
                         "round_period": 1.0, "min_wait": 0.2, "peer_timeout": 3.0, "heartbeat": 0.5, **kw})


def watch(sim: Simulation) -> dict[int, dict[int, torch.Tensor]]:
    """Each peer's model right after it mixed each round (peer -> round -> flat model)."""
    after: dict[int, dict[int, torch.Tensor]] = {p: {} for p in sim.nodes}
    for p, nd in sim.nodes.items():
        def mix(rnd, nbh, banned, nd=nd, orig=nd.mixer.mix, seen=after[p]):
            out = orig(rnd, nbh, banned)
            seen[rnd] = flatten(nd.mixer.model()).double().clone()
            return out
        nd.mixer.mix = mix
    return after


def spread(after: dict[int, dict[int, torch.Tensor]], peers: list[int], rnd: int) -> tuple[float, torch.Tensor]:
    """The consensus distance sqrt(mean_i ||x_i - mean||^2) of `peers` after round `rnd`, and the mean."""
    x = torch.stack([after[p][rnd] for p in peers])
    m = x.mean(0)
    return float((x - m).norm(dim=1).pow(2).mean().sqrt()), m


def overlay(sim: Simulation, peers: list[int]) -> nx.Graph:
    """The union of the peers' active views; asserts that every link is held at both ends."""
    g = nx.Graph()
    g.add_nodes_from(peers)
    for p in peers:
        for q in sim.nodes[p].nbh.views.active:
            assert p in sim.nodes[q].nbh.views.active, f"peer {p} holds {q} in its active view, not the reverse"
            g.add_edge(p, q)
    return g


def test_32_peers_join_through_peer_0_and_gossip_exactly():
    rounds = 45
    # --min-wait past the round period: peers keep the round phase they joined at, and a deadline
    # shorter than the phase offsets would mix stale replicas, whose debt settles a round later
    sim = Simulation(OpenNet(ids=list(range(N))), cfg(rounds=rounds, min_wait=1.5), starts={p: 0.1 * p for p in range(N)})
    after = watch(sim)
    sim.advance(30.5)  # every peer joined 27 s ago
    g = overlay(sim, list(range(N)))
    assert min(d for _, d in g.degree) >= 1 and nx.is_connected(g)
    sim.run()
    assert set(sim.codes.values()) == {0}

    recs = sim.records
    for p in range(1, N):  # a joiner mixes within 3 rounds of its first round (it starts at the network's round)
        first = recs[p][0]["round"]
        assert any(r["mixed_with"] for r in recs[p] if r["round"] <= first + 2), (p, [r["mixed_with"] for r in recs[p][:3]])
    everyone = min(r for r in range(rounds) if all(r in after[p] and recs[p] for p in range(N)))
    d0, _ = spread(after, list(range(N)), everyone)
    d1, m1 = spread(after, list(range(N)), rounds - 1)
    assert d1 <= 1e-3 * d0, (everyone, d0, d1)
    links = [{(p, q) for p in range(N) for r in recs[p] if r["round"] == rnd for q in r["mixed_with"]} for rnd in range(rounds)]
    settled = max(r for r in range(1, rounds) if links[r] != links[r - 1])  # new peers switch links for a while
    assert settled <= rounds - 10 and all((q, p) in links[-1] for p, q in links[-1])
    _, m0 = spread(after, list(range(N)), settled)  # from then on exact gossip keeps the mean
    assert float((m1 - m0).abs().max()) <= 1e-5
    bound = 3 * relative_std(64)  # K = 64: 12.7 %
    for p in range(N):
        last = recs[p][-1]
        assert abs(last["network_size_estimate"] / N - 1) <= bound, (p, last["network_size_estimate"])
        assert math.isnan(last["consensus_distance"]) and last["consensus_absent"] == NO_ESTIMATE
        assert not last["internal_errors"]


def test_churn_joins_leaves_and_crashes_mid_run():
    """24 peers, 8 more join mid-run, 4 say goodbye and 4 crash: every live peer finishes, and the
    live peers' consensus keeps contracting after the churn."""
    rounds, n = 40, 32
    starts = {p: 0.1 * p for p in range(24)} | {p: 12.0 + 0.5 * (p - 24) for p in range(24, n)}
    leaves = {p: 20.0 for p in (3, 9, 27, 30)}
    crashes = {p: 22.0 for p in (5, 14, 25, 29)}
    # --min-wait past the phase offsets, as in the test above: every live link is waited for
    sim = Simulation(OpenNet(ids=list(range(n)), leaves=leaves, crashes=crashes), cfg(rounds=rounds, min_wait=1.5), starts=starts)
    after = watch(sim)
    live = [p for p in range(n) if p not in leaves and p not in crashes]
    sim.advance(35.0)  # those gone are out of every live peer's active view, the live peers' overlay is connected
    assert nx.is_connected(overlay(sim, live)) and not any(sim.nodes[p].nbh.views.active & (set(leaves) | set(crashes)) for p in live)
    sim.run()  # returns: no live peer waits forever
    assert all(sim.codes[p] == 0 for p in live) and all(sim.codes[p] == 0 for p in leaves)
    assert all(max(r["round"] for r in sim.records[p]) == rounds - 1 for p in live)
    for p in range(24, n):  # late joiners mix within 3 rounds of their first round
        first = sim.records[p][0]["round"]
        assert first > 5 and any(r["mixed_with"] for r in sim.records[p] if r["round"] <= first + 2), p
    d_churn, _ = spread(after, live, 25)
    d_mid, _ = spread(after, live, 32)
    d_end, _ = spread(after, live, rounds - 1)
    assert d_end < 0.1 * d_mid < 0.1 * d_churn, (d_churn, d_mid, d_end)


def test_bad_view_messages_are_refused_by_rule_and_a_fixed_topology_refuses_views():
    from p2pfl.core import topology as T
    from p2pfl.core.membership.messages import ViewKind, ViewMsg
    from p2pfl.core.state import synthetic_state
    from p2pfl.core.wire import Kind, Message, encode
    from p2pfl.node.build import make_node, make_open_node
    from p2pfl.node.membership import view_message
    from p2pfl.node.node import NodeSpec

    spec = NodeSpec(x0=synthetic_state(0, 1, 64), inc=7, train=False)
    node = make_open_node(cfg(id=1, rounds=2), 0, spec, net=5)
    node.start(0.0)

    def send(msg, sender=2):
        msg.net = 5
        node.receive([bytes(f) for f in encode(msg)], sender, 0.1)

    join = view_message(2, 9, ViewMsg(ViewKind.JOIN, contact=b"x" * 600))  # a payload over max_payload (512)
    send(join)
    long = view_message(2, 9, ViewMsg(ViewKind.JOIN))
    raw = long.tensors["view"].parts["data"]
    long.tensors["view"].parts["data"] = torch.cat([raw, torch.zeros(5000, dtype=torch.uint8)])  # over max_message_bytes
    long.tensors["view"].shape = (raw.numel() + 5000,)
    send(long)
    for _ in range(101):  # over the rate bucket (burst 100)
        send(view_message(3, 9, ViewMsg(ViewKind.NEIGHBOR, contact=b"c")), sender=3)
    assert node.intake.by_reason == {"view-malformed": 2, "view-rate": 1}
    assert 3 in node.nbh.views.active  # the requests it did take
    send(Message(Kind.HEARTBEAT, 4, inc=9), sender=4)  # a model message from outside the active view
    assert node.intake.by_reason["not-neighbour"] == 1

    ring = T.generate("ring", 4)
    static = make_node(PeerConfig(topology=Path("mem"), id=0, no_train=True, dim=64, rounds=2), ring, NodeSpec(x0=spec.x0, inc=1, train=False))
    msg = view_message(1, 9, ViewMsg(ViewKind.JOIN))
    msg.net = ring.network_id()
    static.receive([bytes(f) for f in encode(msg)], 1, 0.0)
    assert static.intake.by_reason == {"view-unexpected": 1}
