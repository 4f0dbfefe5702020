"""The round state machine in process: purity, decisions over a virtual clock, equivalence of layouts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.consensus import exact_distance, network_mean
from p2pfl.core.state import synthetic_state
from p2pfl.core.wire import Kind, Message, TensorPayload, encode
from p2pfl.node.actions import Send
from p2pfl.node.build import make_node
from p2pfl.node.node import NodeSpec, Phase
from p2pfl.sim.simulation import Simulation

ROOT = Path(__file__).resolve().parent.parent


def replace_id(c: PeerConfig, p: int) -> PeerConfig:
    from dataclasses import replace

    return replace(c, id=p)


def cfg(**kw) -> PeerConfig:
    base = {"topology": Path("mem"), "id": 0, "no_train": True, "dim": 2048, "rounds": 20, "sketch_dim": 256}
    return PeerConfig(**{**base, **kw})


def test_simulated_exact_gossip_meets_the_spectral_bound_and_keeps_the_mean():
    topo = T.generate("ring", 8)
    sim = Simulation(topo, cfg(rounds=20))
    x0 = {p: synthetic_state(0, p, 2048) for p in topo.ids}
    sim.run()
    xi0, xi = exact_distance(x0.values()), exact_distance(sim.models().values())
    assert xi <= topo.mixing_lambda() ** 20 * xi0 * (1 + 1e-9)
    assert torch.allclose(network_mean(sim.models().values()), network_mean(x0.values()), rtol=1e-5, atol=1e-7)
    last = {p: recs[-1] for p, recs in sim.records.items()}
    assert all(r["round"] == 19 and r["consensus_peers"] == 8 for r in last.values())
    for r in last.values():  # every peer's own estimate of the final spread
        assert r["consensus_distance"] == pytest.approx(xi, rel=0.15)


@pytest.mark.parametrize(("spec", "why"), [("topk:2", "fraction 2 is outside (0, 1]"), ("int8,int8", "two defaults"),
                                          ("fp16,*lora_A*=zip", "unknown codec 'zip'")])
def test_a_bad_codec_plan_is_a_config_error_that_names_compress(spec, why):
    topo = T.generate("ring", 4)
    with pytest.raises(ConfigError) as e:
        make_node(cfg(compress=spec), topo, NodeSpec(x0=synthetic_state(0, 0, 64), inc=1, train=False))
    assert str(e.value).startswith(f"--compress {spec!r}: ") and why in str(e.value)


def test_deadline_mixes_without_a_silent_neighbour_and_records_it():
    topo = T.generate("ring", 4)
    silent = 2
    sim = Simulation(topo, cfg(rounds=12, min_wait=0.5, round_timeout=3.0), drop=lambda s, d, m: s == silent and m.kind == Kind.DELTA)
    sim.run()
    r1 = sim.records[1]
    assert r1[0]["late_neighbors"] == [silent]  # waited for, then left out
    assert r1[0]["wait_s"] == pytest.approx(3.0, abs=0.01)  # the first deadline is the ceiling
    assert sim.nodes[1].mixer.engine.replicas[silent].round == -1  # nothing of 2's was ever mixed
    assert all([r["round"] for r in recs] == list(range(12)) for recs in sim.records.values())
    # Peer 0's neighbours are the slow ones now; its adaptive deadline (min_wait 0.5) does not wait for them.
    assert all(r["late_neighbors"] == [1, 3] and r["wait_s"] == pytest.approx(0.5, abs=0.01) for r in sim.records[0][1:])


def test_adaptive_deadline_follows_the_waits():
    topo = T.generate("ring", 4)
    sim = Simulation(topo, cfg(rounds=6, min_wait=0.2), latency=0.05)
    sim.run()
    nd = sim.nodes[0]
    assert nd.wait_ewma is not None and nd.wait_ewma < 0.2
    assert nd._deadline() == pytest.approx(max(0.2, 4 * nd.wait_ewma + 0.5))


def test_heartbeats_mark_a_silent_neighbour_down_and_its_weight_moves_to_self():
    topo = T.generate("ring", 3)
    node = make_node(cfg(rounds=3, peer_timeout=5.0, startup_timeout=100.0), topo, NodeSpec(x0=synthetic_state(0, 0, 2048), inc=5, train=False))
    out = node.start(0.0)
    assert {a.dest for a in out if isinstance(a, Send) and a.msg.kind == Kind.HELLO} == {1, 2}
    hello = Message(Kind.HELLO, 1, inc=7, net=topo.network_id())
    node.receive([bytes(f) for f in encode(hello)], 1, 0.1)
    assert node.nbh.live == {1} and node.phase is Phase.STARTUP  # still waiting for 2
    node.tick(6.0)
    assert node.nbh.live == set() and node.phase is Phase.STARTUP
    assert node.next_wakeup() <= 7.0


def test_a_message_of_another_network_is_refused_without_a_strike():
    topo = T.generate("ring", 4, base_port=20000)
    same = T.generate("ring", 4, base_port=20000)
    same.settings = {"trainer": {"lr": 0.1}}  # settings may change between restarts of one network
    other = T.generate("ring", 4, base_port=20010)  # a stale run on other ports, or another file
    assert topo.network_id() == same.network_id() != other.network_id()
    assert T.generate("complete", 4, base_port=20000).network_id() != topo.network_id()  # the graph counts
    node = make_node(cfg(), topo, NodeSpec(x0=synthetic_state(0, 0, 2048), inc=5, train=False))
    out = node.start(0.0)
    assert {a.msg.net for a in out if isinstance(a, Send)} == {topo.network_id()}
    for k in range(30):  # more than `strikes`: were they strikes, peer 1 would be marked misbehaving
        node.receive([bytes(f) for f in encode(Message(Kind.HELLO, 1, inc=7, net=other.network_id()))], 1, 0.1 + k / 100)
    assert node.intake.by_reason == {"network": 30} and node.nbh.live == set() and node.intake.conduct.bans == 0 and node.phase is Phase.STARTUP
    node.receive([bytes(f) for f in encode(Message(Kind.HELLO, 1, inc=7, net=topo.network_id()))], 1, 0.5)
    assert node.nbh.live == {1} and node.intake.rejected == 30


def test_a_forged_sender_is_refused_by_identity():
    topo = T.generate("ring", 3)
    node = make_node(cfg(), topo, NodeSpec(x0=synthetic_state(0, 0, 2048), inc=5, train=False))
    node.start(0.0)
    node.receive([bytes(f) for f in encode(Message(Kind.HELLO, 1, inc=7))], 2, 0.1)  # peer 2's channel claims to be 1
    assert node.intake.by_reason == {"identity": 1} and node.nbh.live == set()
    node.receive([b"\x00garbage"], 1, 0.2)
    assert node.intake.by_reason["wire"] == 1


def test_max_lag_leaves_a_far_behind_neighbour_out():
    topo = T.generate("ring", 3)
    node = make_node(cfg(max_lag=2), topo, NodeSpec(x0=synthetic_state(0, 0, 2048), inc=5, train=False))
    node.nbh.liveness.live = {1, 2}
    node.nbh.rounds = {1: 10, 2: 3}
    assert node.nbh.participants(10) == {1}


def test_stop_finishes_after_the_current_round_and_neighbours_see_the_goodbye():
    topo = T.generate("ring", 4)
    sim = Simulation(topo, cfg(rounds=50))
    sim._process(lambda: sim.nodes[0].rnd >= 3)
    sim.nodes[0].stop()
    sim._process(lambda: sim.nodes[0].finished)
    assert sim.codes[0] == 0 and math.isinf(sim.nodes[0].next_wakeup())
    stopped_at = sim.nodes[0].round
    assert 3 <= stopped_at < 6
    sim.run()  # the others go on without it
    assert sim.records[1][-1]["round"] == 49 and 0 not in sim.nodes[1].nbh.live


@pytest.mark.parametrize("kind,n", [("exponential", 64), ("ring", 8)])
def test_gossip_estimator_in_the_node_tracks_the_exact_distance_at_its_lag(kind, n):
    topo = T.generate(kind, n)
    rounds = 20
    sim = Simulation(topo, cfg(rounds=rounds, estimator="gossip", sketch_dim=1024, dim=4096))
    nd = sim.nodes[0]
    lag, every = nd.monitor.estimator.cfg.lag, nd.monitor.estimator.cfg.every
    assert rounds % every == 0 and nd.drain == lag + 1
    sim.run()
    final = exact_distance(sim.models().values())
    for p, recs in sim.records.items():
        assert [r["round"] for r in recs] == list(range(rounds))
        est = {r["round"] + 1: r["consensus_distance"] for r in recs}
        assert all(math.isnan(v) for r, v in est.items() if r % every), "estimates only on the estimator's rounds"
        last = recs[-1]["consensus_distance"]
        assert last == pytest.approx(final, rel=0.10), (p, last, final)
        assert recs[-1]["consensus_lag"] == lag
    # the payload travels with every delta and does not grow with n: at most ceil(lag / every) rows of k + 1
    assert sim.bytes_sent[0] / (rounds + nd.drain) < 2 * (math.ceil(lag / every) * 1025 * 8 + 4096 * 4) * topo.degree(0) + 4096


def test_estimator_payload_that_is_malformed_is_refused_and_the_delta_still_applies():
    topo = T.generate("exponential", 64)
    c = cfg(estimator="gossip", sketch_dim=64, dim=512)
    node = make_node(c, topo, NodeSpec(x0=synthetic_state(0, 0, 512), inc=5, train=False))
    sender = topo.neighbors(0)[0]
    other = make_node(replace_id(c, sender), topo, NodeSpec(x0=synthetic_state(0, sender, 512), inc=9, train=False))
    delta = other.mixer.engine.make_delta(0)
    delta.tensors["_estimate"] = TensorPayload("none", (1, 65), {"data": torch.full((1, 65), math.nan, dtype=torch.float64)})
    delta.info["estimate"] = [[0, 0]]
    node.start(0.0)
    node.receive([bytes(f) for f in encode(Message(Kind.HELLO, sender, inc=9, net=topo.network_id()))], sender, 0.0)
    delta.net = topo.network_id()
    node.receive([bytes(f) for f in encode(delta)], sender, 0.1)
    assert node.intake.by_reason.get("estimate") == 1
    assert 0 in node.mixer.engine.replicas[sender].pending  # the CHOCO delta was kept (held for round 0)


def test_sign_compressed_choco_in_the_simulator_reaches_the_exact_gossip_target_with_bit_identical_replicas():
    """The 420-round one-scale sign run of tests/test_cluster.py, on the same nodes in process."""
    topo = T.generate("ring", 8)
    dim, rounds = 2048, 420  # sign's compression quality (||v||_1^2 / (d ||v||^2)) does not depend on d
    sim = Simulation(topo, cfg(rounds=rounds, dim=dim, compress="sign:tensor", gamma=0.7, estimator="flood"))
    sim.run()
    x0 = [synthetic_state(0, p, dim) for p in topo.ids]
    xT = list(sim.models().values())
    assert exact_distance(xT) < 1e-2 * exact_distance(x0)  # exact gossip: 22 rounds to 1e-2 on ring-8
    m0, mT = network_mean(x0), network_mean(xT)
    assert float((mT - m0).norm() / m0.norm()) < 1e-4
    for p in topo.ids:
        for j in topo.neighbors(p):
            mine, theirs = sim.nodes[p].mixer.engine.replicas[j].xhat, sim.nodes[j].mixer.engine.xhat
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs), (p, j)
    last = sim.records[0][-1]
    assert last["compression_ratio"] > 25 and 0 < last["compression_error"] < 1


def _training_node() -> tuple:
    """A training peer of ring-3 whose neighbours are up and whose round-0 Train action is out."""
    topo = T.generate("ring", 3)
    node = make_node(cfg(rounds=3, min_wait=0.1), topo, NodeSpec(x0={"w": torch.zeros(8)}, inc=5, train=True))
    node.start(0.0)
    for j in (1, 2):
        node.receive([bytes(f) for f in encode(Message(Kind.HELLO, j, inc=7 + j, net=topo.network_id()))], j, 0.1)
    out = node.evaluated({"accuracy": 0.5, "global_accuracy": 0.5}, 0.2)  # the zero-shot evaluation; round 0 trains
    assert node.phase is Phase.TRAINING and [type(a).__name__ for a in out if type(a).__name__ == "Train"] == ["Train"]
    return node, topo


def test_a_peer_failed_while_its_trainer_works_takes_no_checkpoint_and_ignores_the_late_answer():
    """The host reads the trainer's optimizer state for a checkpoint; while a worker thread steps
    that optimizer the state would be torn, so a peer that fails with work out takes none (the last
    periodic checkpoint stands), and the training answer that comes after it finished is dropped."""
    node, _ = _training_node()
    out = node.fail("the process is going down", 0.3)
    kinds = [type(a).__name__ for a in out]
    assert "Finish" in kinds and "Checkpoint" not in kinds and node.phase is Phase.DONE
    assert node.trained({"train_loss": 1.0}, {"w": torch.ones(8)}, 0.4) == []
    assert node.evaluated({"accuracy": 0.5}, 0.5) == []
    idle = make_node(cfg(rounds=3), T.generate("ring", 3), NodeSpec(x0={"w": torch.zeros(8)}, inc=5, train=True))
    assert "Checkpoint" in [type(a).__name__ for a in idle.fail("a trainer failed", 0.0)]  # no work out: a consistent one
