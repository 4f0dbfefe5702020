"""Time-varying schedules: the mixing matrices, the same graph on every peer, the topology file,
and the nodes running them in the simulator against what the matrices predict."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.consensus import flatten
from p2pfl.core.schedule import Schedule, ScheduleError, parse_schedule, random_regular_edges
from p2pfl.core.state import synthetic_state
from p2pfl.core.wire import Kind
from p2pfl.host.files import dump_topology, load_topology
from p2pfl.node.actions import Disconnect
from p2pfl.node.build import make_node
from p2pfl.node.node import NodeSpec
from p2pfl.sim.simulation import Simulation

SPECS = ["one-peer-exponential", "random-regular:4", "epidemic:3"]


def schedule(spec: str, n: int, seed: int = 0) -> Schedule:
    return Schedule(parse_schedule(spec), tuple(range(n)), seed)


@pytest.mark.parametrize("n", [16, 96])
@pytest.mark.parametrize("spec", SPECS)
def test_mixing_matrices_are_doubly_stochastic_or_column_stochastic_for_epidemic(spec, n):
    s = schedule(spec, n, seed=3)
    for t in range(12):
        w = s.matrix(t)
        assert (w >= 0).all() and np.abs(w.sum(0) - 1).max() < 1e-12  # every sender's mass is kept
        g = s.graph(t)
        assert all(len(g.out[p]) == s.out_degree() and p not in g.out[p] for p in s.ids)
        if spec.startswith("epidemic"):
            assert all(np.count_nonzero(w[:, j]) == 4 for j in range(n))  # its own share and one to each of S = 3 targets
            assert np.abs(w.sum(1) - 1).max() > 0.1  # in-degrees vary: the rows are not stochastic
        else:
            assert np.abs(w.sum(1) - 1).max() < 1e-12
        if spec.startswith("random-regular"):
            assert np.array_equal(w, w.T) and all(len(g.inn[p]) == 4 for p in s.ids)


def test_push_sum_weights_turn_the_epidemic_products_into_averaging():
    s = schedule("epidemic:3", 32, seed=1)
    p = np.eye(32)
    for t in range(40):
        p = s.matrix(t) @ p
    estimates = p / p.sum(1, keepdims=True)  # diag(P 1)^-1 P: what the de-biased models hold
    assert np.abs(estimates.sum(1) - 1).max() < 1e-12
    assert np.abs(estimates - 1 / 32).max() < 1e-6  # every estimate is the average
    assert np.abs(p.sum(0) - 1).max() < 1e-12  # and no mass was lost on the way


def test_a_push_sum_peer_that_mixes_alone_for_hundreds_of_rounds_keeps_its_model():
    """A restarted epidemic peer behind the network hears nobody for a while, and its push-sum
    weight shrinks by S + 1 each round. Its model must stay exactly what it was: the old mix
    multiplied the float32 tensors by the weight first, which underflowed after ~60 rounds (the
    model blurred) and then gave 0/0 (NaN, and a peer that could no longer send)."""
    from p2pfl.core.scheduled import MIN_WEIGHT, FullGossip

    x = {"w": torch.randn(1024, generator=torch.Generator().manual_seed(0)) * 0.35}
    before = x["w"].clone()
    g = FullGossip(3, schedule("epidemic:3", 8), x, "none", seed=0, inc=1, window=8)
    for rnd in range(600):
        g.outgoing(rnd, x, empty=False)
        g.mix(rnd, x, set())
        g.end_round(rnd)
    assert torch.equal(x["w"], before)
    assert g.weight == MIN_WEIGHT > 0  # 4^-600 underflows float64; the weight stays sendable


@pytest.mark.parametrize("spec", SPECS)
def test_every_peer_computes_the_same_round_graph_from_seed_and_round_alone(spec):
    n = 24
    a = schedule(spec, n, seed=7)
    b = schedule(spec, n, seed=7)
    for t in range(30):  # fill and evict a's cache
        a.graph(t)
    for t in [29, 3, 17, 0]:  # b sees the rounds in another order
        ga, gb = a.graph(t), b.graph(t)
        assert ga.out == gb.out and ga.inn == gb.inn and ga.weights == gb.weights
        assert all(i in ga.inn[j] for i in range(n) for j in ga.out[i])  # what i sends, j expects
        assert all(j in ga.out[i] for j in range(n) for i in ga.inn[j])
    if spec != "one-peer-exponential":
        assert schedule(spec, n, seed=8).graph(3).out != a.graph(3).out
        assert a.graph(3).out != a.graph(4).out  # fresh edges every round


@pytest.mark.parametrize("n", [16, 32, 64])
def test_one_peer_exponential_averages_exactly_in_log2_n_rounds(n):
    s = schedule("one-peer-exponential", n)
    tau = int(math.log2(n))
    assert s.period == tau
    for start in range(tau):
        p = np.eye(n)
        for t in range(start, start + tau):
            p = s.matrix(t) @ p
        assert np.abs(p - 1 / n).max() < 1e-12
        p = np.eye(n)
        for t in range(start, start + tau - 1):  # one round fewer does not
            p = s.matrix(t) @ p
        # circulant: mode m keeps prod_k |cos(pi m 2^k / n)| over the hops used
        left = max(math.prod(abs(math.cos(math.pi * m * 2 ** (t % tau) / n)) for t in range(start, start + tau - 1)) for m in range(1, n))
        assert np.linalg.norm(p - 1 / n, 2) == pytest.approx(left, rel=1e-9) and left > 0.5
    assert s.contraction() == 0.0 and s.rounds_to(1e-3) == tau and s.flood_rounds() == tau


def test_one_peer_exponential_on_other_sizes_contracts_but_not_exactly():
    s = schedule("one-peer-exponential", 24)
    assert s.period == 5 and 0 < s.contraction() < 1
    assert all(len(s.graph(t).inn[p]) == 1 for t in range(5) for p in s.ids)


def test_random_regular_edges_are_simple_and_regular():
    rng = np.random.default_rng(0)
    for n, d in [(96, 7), (10, 3), (8, 7)]:
        edges = random_regular_edges(n, d, rng)
        assert len(set(edges)) == len(edges) == n * d // 2 and all(a < b for a, b in edges)
        assert np.bincount(np.array(edges).ravel(), minlength=n).tolist() == [d] * n


@pytest.mark.parametrize("text,needle", [
    ("ring", "unknown schedule"), ("random-regular", "needs a positive integer"), ("epidemic:0", "needs a positive integer"),
    ("one-peer-exponential:2", "takes no parameter"), (3, "expected one of"),
])
def test_bad_schedule_specs_name_the_value(text, needle):
    with pytest.raises(ScheduleError, match=needle):
        parse_schedule(text)


def _file(tmp_path: Path, body: str, n: int = 6) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text("peers:\n" + "".join(f"  - {{id: {i}, host: 127.0.0.1, port: {30000 + i}}}\n" for i in range(n)) + body)
    return path


def test_a_file_with_only_peers_and_a_schedule_is_valid_and_round_trips(tmp_path):
    t = load_topology(_file(tmp_path, "schedule: random-regular:2\n"))
    assert t.schedule == parse_schedule("random-regular:2") and t.graph.number_of_edges() == 0 and t.neighbors(0) == []
    assert 0 < t.mixing_lambda() < 1 and t.diameter() >= 2 and t.rounds_to(1e-3) > 1
    dump_topology(t, tmp_path / "back.yaml")
    back = load_topology(tmp_path / "back.yaml")
    assert back.schedule == t.schedule and "edges" not in (tmp_path / "back.yaml").read_text()


@pytest.mark.parametrize("body,needle", [
    ("edges: [[0, 1]]\nschedule: one-peer-exponential\n", "remove 'edges' (a scheduled file lists only peers)"),
    ("generator: {kind: ring}\nschedule: epidemic:2\n", "remove 'generator'"),
    ("schedule: random-regular:3\n", "odd number of peers"),
    ("schedule: epidemic:6\n", "only 5 others exist"),
    ("schedule: moebius\n", "schedule: unknown schedule 'moebius'"),
])
def test_a_schedule_with_edges_or_one_the_peers_cannot_run_is_refused(tmp_path, body, needle):
    n = 5 if "odd" in needle else 6
    with pytest.raises(T.TopologyError) as e:
        load_topology(_file(tmp_path, body, n))
    assert needle in str(e.value)


def test_inspect_reports_the_expected_contraction_per_round(tmp_path, capsys):
    from p2pfl.ops.cli import topology_main

    path = _file(tmp_path, "schedule: epidemic:2\n", n=16)
    assert topology_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    lam = load_topology(path).mixing_lambda()
    assert f"expected contraction per round ||M_T||^(1/T) = {lam:.6f}" in text and "whole models" in text
    assert topology_main(["inspect", str(path), "--json"]) == 0
    assert '"schedule": "epidemic:2"' in capsys.readouterr().out


# ---------------------------------------------------------------- the nodes on a virtual clock


def xi(rows) -> float:
    """The consensus distance of models given as rows (or a list of flat tensors)."""
    x = torch.stack(list(rows)).double()
    return float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt())


def mean(rows) -> torch.Tensor:
    return torch.stack(list(rows)).double().mean(0)


def cfg(**kw) -> PeerConfig:
    base = {"topology": Path("mem"), "id": 0, "no_train": True, "dim": 1024, "rounds": 12, "sketch_dim": 128}
    return PeerConfig(**{**base, **kw})


def predicted(s: Schedule, x0: list[torch.Tensor], rounds: int) -> torch.Tensor:
    """What exact gossip on the schedule's matrices gives: diag(P 1)^-1 P X_0 (push-sum estimates)."""
    p = np.eye(s.n)
    for t in range(rounds):
        p = s.matrix(t) @ p
    return torch.from_numpy(p / p.sum(1, keepdims=True)) @ torch.stack(x0).double()


@pytest.mark.parametrize("spec", SPECS)
def test_nodes_gossip_exactly_what_the_schedule_matrices_predict_and_keep_the_mean(spec):
    topo = T.scheduled(spec, 16)
    rounds = 12
    sim = Simulation(topo, cfg(rounds=rounds))
    x0 = [flatten(synthetic_state(0, p, 1024)) for p in topo.ids]
    sim.run()
    got = sim.flat()
    s = topo.schedule_for(0)
    want = predicted(s, x0, rounds)
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
    omega = torch.tensor([nd.mixer.exchange.weight if s.push_sum else 1.0 for nd in sim.nodes.values()], dtype=torch.float64)
    assert s.push_sum or bool((omega == 1).all())
    kept = (omega[:, None] * got).mean(0)  # push-sum keeps sum_i omega_i x_i; the others sum_i x_i
    assert torch.allclose(kept, mean(x0).double(), rtol=1e-5, atol=1e-6)
    xi0 = xi(x0)
    final = xi(want)  # round r's record carries the sketches of the models after its mixing
    for r in (recs[-1] for recs in sim.records.values()):  # flooded sketches: every peer's own estimate
        assert r["round"] == rounds - 1 and r["consensus_peers"] == 16
        assert r["consensus_distance"] == pytest.approx(final, rel=0.3, abs=1e-5 * xi0)
        assert r["late_neighbors"] == [] and r["live_neighbors"] == len(s.graph(rounds - 1).inn[r["peer"]])


def test_one_peer_exponential_nodes_reach_the_exact_average_after_log2_n_rounds():
    topo = T.scheduled("one-peer-exponential", 16)
    sim = Simulation(topo, cfg(rounds=4, sketch_dim=0))
    x0 = [flatten(synthetic_state(0, p, 1024)).double() for p in topo.ids]
    sim.run()
    avg = mean(x0)
    assert float((sim.flat() - avg).abs().max()) < 1e-5 * float(avg.abs().max())
    assert max(sim.bytes_sent.values()) < 5 * (4 * 1024 * 4 + 4096)  # one model-sized delta a round (and drain)


@pytest.mark.parametrize("codec,rounds", [("int8", 80), ("fp16", 40)])
def test_per_edge_choco_replicas_stay_bit_identical_and_compressed_gossip_reaches_consensus(codec, rounds):
    topo = T.scheduled("one-peer-exponential", 16)
    sim = Simulation(topo, cfg(rounds=rounds, sketch_dim=0, compress=codec))
    x0 = [flatten(synthetic_state(0, p, 1024)) for p in topo.ids]
    sim.run()
    assert xi(sim.flat()) < 1e-5 * xi(x0)
    assert float((mean(sim.flat()) - mean(x0)).norm()) < 1e-5 * float(mean(x0).norm())
    for p, nd in sim.nodes.items():
        for eng in nd.mixer.exchange.engines:  # each edge's copy, on both ends
            theirs = sim.nodes[eng.src].mixer.exchange.by_dest[p].xhat
            assert all(torch.equal(eng.replicas[eng.src].xhat[k], theirs[k]) for k in theirs)
    assert sim.records[0][-1]["compression_ratio"] > 1.9


def test_fresh_edges_refuse_a_codec_only_replicas_would_correct():
    topo = T.scheduled("random-regular:3", 8)
    with pytest.raises(ConfigError, match=r"no replica corrects a lossy codec \(int8\)"):
        make_node(cfg(compress="int8"), topo, NodeSpec(x0=synthetic_state(0, 0, 1024), inc=1, train=False))
    make_node(cfg(compress="fp16"), topo, NodeSpec(x0=synthetic_state(0, 0, 1024), inc=1, train=False))


@pytest.mark.parametrize("kw,needle", [({"robust": "median"}, "a schedule with --robust"), ({"estimator": "gossip"}, "--estimator gossip"),
                                       ({"clusters": "2"}, "a schedule with --clusters"), ({"algorithm": "adam"}, "--algorithm")])
def test_what_a_schedule_cannot_run_is_refused(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        make_node(cfg(**kw), T.scheduled("epidemic:2", 8), NodeSpec(x0=synthetic_state(0, 0, 1024), inc=1, train=False))


@pytest.mark.parametrize("spec", SPECS)
def test_a_silent_peer_is_skipped_in_its_rounds_and_not_waited_for_again(spec):
    topo = T.scheduled(spec, 8)
    silent = 3
    sim = Simulation(topo, cfg(rounds=10, min_wait=0.5, round_timeout=3.0, sketch_dim=0),
                     drop=lambda s, d, m: s == silent and m.kind in (Kind.DELTA, Kind.STATE))
    sim.run()
    s = topo.schedule_for(0)
    receivers = [p for p in topo.ids if p != silent]
    waited = {p: [r["wait_s"] for r in sim.records[p]] for p in receivers}
    for p in receivers:
        recs = sim.records[p]
        assert [r["round"] for r in recs] == list(range(10))
        first = next((t for t in range(10) if silent in s.graph(t).inn[p]), None)
        if first is None:
            continue
        assert silent in recs[first]["late_neighbors"]
        assert all(silent not in r["late_neighbors"] for r in recs[first + 1:])  # suspected: not waited for again
        assert all(w < 0.6 for w in waited[p][first + 1:])
    assert any(r["late_neighbors"] for p in receivers for r in sim.records[p])


@pytest.mark.parametrize("spec", SPECS)
def test_a_peer_that_starts_late_is_waited_for_within_the_start_up_window(spec):
    """Sites start their peers minutes apart. A peer never heard from may still be starting, so
    rounds wait for it up to the start-up window, not the adaptive deadline its fast neighbours set;
    once heard from, the adaptive deadline applies. Exact gossip: every model ends at the mean."""
    topo = T.scheduled(spec, 8)
    late, at = 3, 20.0
    c = cfg(rounds=6, min_wait=0.5, round_timeout=3.0, startup_timeout=40.0, sketch_dim=0)
    sim = Simulation(topo, c, starts={late: at})
    x0 = [flatten(synthetic_state(0, p, 1024)).double() for p in topo.ids]
    sim.run()
    for p in topo.ids:
        assert [r["round"] for r in sim.records[p]] == list(range(6)) and all(r["late_neighbors"] == [] for r in sim.records[p]), p
    s = topo.schedule_for(0)
    first = min(t for t in range(6) for p in topo.ids if late in s.graph(t).inn[p])
    waiting = [p for p in topo.ids if late in s.graph(first).inn[p]]
    assert all(sim.records[p][first]["wait_s"] > at - 1 for p in waiting)  # waited for it, past round_timeout
    if spec == "one-peer-exponential":  # exact averaging in log2(8) rounds, the late peer included
        avg = mean(x0)
        assert float((sim.flat() - avg).abs().max()) < 1e-5 * float(avg.abs().max())


def test_links_to_past_round_peers_are_closed_and_stay_few():
    topo = T.scheduled("epidemic:2", 16)
    sim = Simulation(topo, cfg(rounds=8))
    closed: list[int] = []
    run = sim._run

    def watch(p, actions):
        if p == 0:
            closed.extend(a.peer for a in actions if isinstance(a, Disconnect))
        run(p, actions)

    sim._run = watch  # type: ignore[method-assign]
    sim.run()
    s = topo.schedule_for(0)
    expected: list[int] = []
    links: set[int] = set()
    for t in range(8 + sim.nodes[0].drain):  # a link lives through the round after its last use
        need = set(s.graph(t).out[0]) | (set(s.graph(t - 1).out[0]) if t else set())
        expected += sorted(links - need)
        links = need
        assert len(links) <= 4
    assert closed == expected and closed


@pytest.mark.slow
def test_one_peer_exponential_averages_exactly_in_log2_n_rounds_over_real_processes(tmp_path, spawn):
    """16 peers in 4 processes (4 co-hosted each: in process within, TCP across), links opened on
    demand: after log2(16) = 4 rounds every saved model is the average of the starting ones.

    Peers 4-7 start 8 s after the others, later than the 5 s floor of the round deadline: what the
    others queued for them (peer 3's round-0 delta to peer 4, for one) must arrive once they bind,
    and no deadline fires, since peers never heard from are waited for through the start-up window."""
    from p2pfl.host.checkpoint import load_state
    from p2pfl.host.files import read_jsonl

    from .conftest import free_base_port, run_layout

    topo = T.scheduled("one-peer-exponential", 16, base_port=free_base_port(16))
    path = tmp_path / "ope16.yaml"
    dump_topology(topo, path)
    dim = 4096
    run_layout(spawn, path, tmp_path / "run", ["0-3", "4-7", "8-11", "12-15"], "--rounds", "4", "--no-train", "--dim", str(dim),
               "--min-wait", "5", "--sketch-dim", "0", late=("4-7", 8.0))
    x0 = [flatten(synthetic_state(0, p, dim)) for p in topo.ids]
    avg = mean(x0)
    for p in topo.ids:
        recs = read_jsonl(tmp_path / "run" / "metrics" / f"peer-{p}.jsonl")
        assert [r["round"] for r in recs] == [0, 1, 2, 3] and all(r["late_neighbors"] == [] for r in recs), (p, recs)
        assert all(r["live_neighbors"] == 1 for r in recs), (p, recs)
        got = flatten(load_state(tmp_path / "run" / f"peer-{p}" / "adapter.safetensors")).double()
        assert float((got - avg).abs().max()) < 1e-5 * float(avg.abs().max()), p


@pytest.mark.slow
def test_a_killed_schedule_peer_resumes_and_rejoins_over_real_processes(tmp_path, cluster_dir, spawn):
    """Epidemic schedule, peer 3 in a process of its own: SIGKILL after the start-up window, then
    `--resume`. The others go on without it (left out of its rounds, then not waited for), it
    comes back from its checkpoint, never writes a round twice, mixes again, and all finish."""
    import signal

    from .conftest import free_base_port, records, wait_all, wait_until

    topo = T.scheduled("epidemic:3", 8, base_port=free_base_port(8))
    path = tmp_path / "epi8.yaml"
    dump_topology(topo, path)
    rounds = 140  # after the restart about 20 s of paced rounds remain: room for a slow start under load
    args = ["--rounds", str(rounds), "--no-train", "--dim", "1024", "--round-period", "0.2", "--checkpoint-every", "1",
            "--sketch-dim", "0", "--startup-timeout", "5", "--min-wait", "3"]
    procs = {"others": spawn(path, "0-2,4-7", cluster_dir, *args), 3: spawn(path, 3, cluster_dir, *args)}

    # 5 s of paced rounds: past the start-up window
    wait_until(lambda: len(records(cluster_dir, 3)) >= 25, 120, "peer 3's first 25 rounds", procs.values())
    procs[3].send_signal(signal.SIGKILL)
    procs[3].wait()
    killed_at = len(records(cluster_dir, 3))
    due = len(records(cluster_dir, 0)) + 10
    wait_until(lambda: len(records(cluster_dir, 0)) >= due, 120, f"peer 0's round {due}")
    procs[3] = spawn(path, 3, cluster_dir, *args, "--resume")
    assert wait_all(procs, timeout=300) == {"others": 0, 3: 0}
    assert all(records(cluster_dir, p)[-1]["round"] == rounds - 1 for p in topo.ids)
    assert any(3 in r["late_neighbors"] for p in topo.ids if p != 3 for r in records(cluster_dir, p))  # left out while down
    mine = [r["round"] for r in records(cluster_dir, 3)]
    assert mine == sorted(set(mine)) and mine[-1] == rounds - 1  # never a round twice
    assert sum(r["live_neighbors"] for r in records(cluster_dir, 3)[killed_at:]) > 0  # it mixes again after the restart
