"""Wide-area faults: late neighbours keep the mean (in process), and the fault-injecting proxy
(`p2pfl.net.proxy`) between peer processes over real TCP: latency, partitions, resets, a slow link."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from p2pfl.config import PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.consensus import exact_distance, network_mean
from p2pfl.core.gossip import Refused
from p2pfl.core.state import synthetic_state
from p2pfl.core.wire import Kind, Message
from p2pfl.host.checkpoint import load_latest, load_state
from p2pfl.host.files import dump_topology
from p2pfl.net.proxy import Proxy, route
from p2pfl.sim.engines import EngineNetwork
from p2pfl.sim.simulation import Simulation

from .conftest import free_base_port, make_topology, records


def cfg(**kw) -> PeerConfig:
    base = {"topology": Path("mem"), "id": 0, "no_train": True, "dim": 2048, "rounds": 20, "sketch_dim": 256}
    return PeerConfig(**{**base, **kw})


def drift(x0: dict[int, dict[str, torch.Tensor]], models: dict[int, dict[str, torch.Tensor]]) -> float:
    """How far the network mean moved, relative to its norm."""
    m0 = network_mean(x0.values())
    return float((network_mean(models.values()) - m0).norm() / m0.norm())


def test_exact_gossip_keeps_the_mean_when_a_neighbours_deltas_come_late():
    """Peer 3's messages take 2.5 virtual seconds, its neighbours wait at most 1: each of their
    rounds is mixed with a replica that lacks 3's delta of that round, while 3 mixes with their
    full replicas, and the lateness spreads round the ring. The owed terms, added when the late
    deltas come, make each pair symmetric again: exact gossip keeps the mean (it moved by 45 % of
    its norm without them) and still converges."""
    topo = T.generate("ring", 8)
    slow = 3
    sim = Simulation(topo, cfg(rounds=20, min_wait=0.2, round_timeout=1.0), latency=lambda s, d, m: 2.5 if s == slow else 1e-3)
    x0 = {p: synthetic_state(0, p, 2048) for p in topo.ids}
    sim.run()
    assert sum(slow in r["late_neighbors"] for p in (2, 4) for r in sim.records[p]) >= 30  # waited for, in vain
    assert min(sim.records[p][-1]["late_settled"] for p in (2, 4)) >= 19  # late deltas owed for
    assert all(sim.nodes[p].mixer.engine.owed is None for p in topo.ids)  # and every debt paid
    assert drift(x0, sim.models()) < 1e-6
    assert exact_distance(sim.models().values()) < 0.2 * exact_distance(x0.values())


def test_a_robust_rule_owes_nothing_for_late_deltas():
    """Robust aggregation is not a sum of pairwise terms: nothing is owed, and the mean moves."""
    topo = T.generate("ring", 8)
    sim = Simulation(topo, cfg(rounds=8, min_wait=0.2, round_timeout=1.0, robust="clip"),
                     latency=lambda s, d, m: 2.5 if s == 3 else 1e-3)
    sim.run()
    assert all(nd.mixer.engine.settled == 0 and nd.mixer.engine.owed is None for nd in sim.nodes.values())


def test_a_lost_delta_is_sent_again_and_owed_like_a_late_one():
    """Peer 2's deltas of rounds 1 and 2 to peer 3 are lost (a reset connection): 3 mixes those
    rounds with its replica of 2 as it was, while 2 mixes the full pair. Round 3's delta shows the
    gap; 3 asks for the two (info `gap`), 2 still holds them and sends them again, and 3 owes what
    its two rounds left out. Exact gossip keeps the mean and no state travels (a state, the
    answer before, lapsed the debt: the mean moved by 0.21 of its norm)."""
    topo = T.generate("ring", 6)
    x0 = {p: synthetic_state(0, p, 1024) for p in topo.ids}
    net = EngineNetwork(topo, x0)
    kinds: list[Kind] = []
    lost: set[int] = set()

    def drop(src: int, dst: int, msg: Message) -> bool:
        kinds.append(msg.kind)
        if (src, dst, msg.kind) == (2, 3, Kind.DELTA) and msg.round in (1, 2) and msg.seq not in lost:
            lost.add(msg.seq)
            return True
        return False

    for _ in range(12):
        net.step(drop=drop)
    assert lost == {1, 2} and Kind.STATE not in kinds and kinds.count(Kind.RESYNC) == 1
    assert net.engines[3].settled == 3  # round 1's delta owed for rounds 1 and 2, round 2's for round 2
    assert net.stale_replicas() == []
    assert drift(x0, net.states()) < 1e-6


def test_a_heartbeat_shows_a_lost_last_delta_and_a_gap_no_longer_held_gets_a_state():
    """A lost delta that no later delta follows shows on the next heartbeat (its seq counts the
    deltas sent); the sender answers a gap it no longer holds, or a malformed one, as before."""
    topo = T.generate("ring", 4)
    net = EngineNetwork(topo, {p: synthetic_state(0, p, 256) for p in topo.ids})
    net.step()
    net.step(drop=lambda src, dst, msg: (src, dst) == (1, 2))
    a, b = net.engines[1], net.engines[2]
    assert b.replicas[1].round == 0
    (dest, ask), = b.receive(a.heartbeat())
    assert (dest, ask.kind, ask.info) == (1, Kind.RESYNC, {"gap": [1, 2]})
    (_, again), = a.receive(ask)
    assert again is a.sent[1]  # the delta as it was sent, not a state
    assert b.receive(again) == [] and b.replicas[1].round == 1 and b.replicas[1].gap is None
    for _ in range(8):
        net.step()
    a.round += 1  # one answer a round
    (_, state), = a.receive(Message(Kind.RESYNC, 2, inc=1, info={"gap": [1, 2]}))
    assert state.kind == Kind.STATE  # delta 1 left the sender's window
    a.round += 1
    with pytest.raises(Refused, match="must be \\[first, end\\)") as e:
        a.receive(Message(Kind.RESYNC, 2, inc=1, info={"gap": [3, 3]}))
    assert e.value.reason == "resync-gap"


def test_a_gap_whose_request_was_lost_is_asked_for_again_when_a_delta_passes_it():
    """Peer 1's deltas of rounds 1-3 never reach 2 and neither does 2's request for the first,
    made on a heartbeat: the link was down. Round 4's delta comes past the gap a round later,
    and 2 asks again for the whole gap, which 1 still holds: no state, and the replica is exact."""
    topo = T.generate("ring", 4)
    net = EngineNetwork(topo, {p: synthetic_state(0, p, 256) for p in topo.ids})
    a, b = net.engines[1], net.engines[2]
    net.step()
    kinds: list[Kind] = []

    def down(src: int, dst: int, msg: Message) -> bool:
        kinds.append(msg.kind)
        return {src, dst} == {1, 2}

    net.step(drop=down)
    net.deliver(1, 2, a.heartbeat(), drop=lambda src, dst, msg: (src, dst) == (2, 1))  # a gap of one delta, asked for in vain
    net.step(drop=down)
    net.step(drop=down)
    assert b.replicas[1].gap == (1, 2) and b.gaps == 1
    net.step(drop=lambda src, dst, msg: kinds.append(msg.kind) and False)
    assert b.gaps == 2 and b.states == 0 and Kind.STATE not in kinds
    assert b.replicas[1].round == 4 and b.replicas[1].gap is None and net.stale_replicas() == []


# ---------------------------------------------------------------------- over TCP, through the proxy


def routed(tmp: Path, kind: str, n: int, links: list[tuple[int, int]]) -> tuple[T.Topology, Path, Proxy]:
    """A topology file whose `links` (both ways) go through a fault-injecting proxy."""
    topo, _ = make_topology(tmp, kind, n)
    both = [(a, b) for x, y in links for a, b in ((x, y), (y, x))]
    out, proxy = route(topo, free_base_port(len(both)), both)
    path = tmp / f"{kind}-{n}-routed.yaml"
    dump_topology(out, path)
    return topo, path, proxy


async def run_routed(proxy: Proxy, spawn, path: Path, run: Path, blocks: list[str], args: list[str],
                     scenario: Callable[[], Awaitable[None]] | None = None, timeout: float = 240) -> None:
    """Start the proxy and one process per block, the first block first (the others once it
    listens: every peer then starts its rounds within a moment), play `scenario` against them,
    and wait for all to exit 0."""
    run.mkdir(parents=True, exist_ok=True)
    await proxy.start()
    try:
        procs = {blocks[0]: spawn(path, blocks[0], run, *args)}
        while b"run dir" not in (run / f"stdout-{blocks[0]}.log").read_bytes():
            assert procs[blocks[0]].poll() is None, (run / f"stdout-{blocks[0]}.log").read_text()[-2000:]
            await asyncio.sleep(0.05)
        procs.update({b: spawn(path, b, run, *args) for b in blocks[1:]})
        if scenario is not None:
            await asyncio.wait_for(scenario(), timeout)
        end = time.monotonic() + timeout
        while any(pr.poll() is None for pr in procs.values()):
            assert time.monotonic() < end, f"peers did not finish within {timeout} s"
            await asyncio.sleep(0.1)
    finally:
        await proxy.close()
    codes = {b: pr.returncode for b, pr in procs.items()}
    assert codes == dict.fromkeys(blocks, 0), [(run / f"stdout-{b}.log").read_text()[-2000:] for b in blocks]


async def reached(run: Path, peers: list[int], rnd: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not all(records(run, p) and records(run, p)[-1]["round"] >= rnd for p in peers):
        assert time.monotonic() < end, f"peers {peers} did not reach round {rnd} within {timeout} s"
        await asyncio.sleep(0.05)


def finals(run: Path, ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    return {p: load_state(run / f"peer-{p}" / "adapter.safetensors") for p in ids}


def engines(run: Path, p: int) -> dict[str, torch.Tensor]:
    """Peer p's last checkpoint: its x, its public copy xhat and its replicas."""
    ck = load_latest(run / f"peer-{p}")
    assert ck is not None, p
    return ck.tensors


def assert_replicas_match(run: Path, edges: list[tuple[int, int]]) -> None:
    """Each end's replica of the other is bit-identical to that peer's public copy."""
    for a, b in edges:
        for i, j in ((a, b), (b, a)):
            mine, theirs = engines(run, i), engines(run, j)
            names = [k[len("xhat/"):] for k in theirs if k.startswith("xhat/")]
            assert names and all(torch.equal(mine[f"rep/{j}/{k}"], theirs[f"xhat/{k}"]) for k in names), (i, j)


@pytest.mark.slow
def test_a_late_neighbour_over_tcp_keeps_the_exact_gossip_mean(tmp_path, spawn):
    """From round 1 on, what peer 2 of ring-8 sends takes 0.6 s and every deadline is at most
    0.3 s: its neighbours mix most rounds without its delta of that round (and of the round
    before). The owed terms keep the mean to float rounding; without them it moved by 2.7 % of its norm here.
    The four drain rounds (the flood's diameter) give the last late deltas time to come."""
    topo, path, proxy = routed(tmp_path, "ring", 8, [(1, 2), (2, 3)])
    run = tmp_path / "run"
    args = ["--no-train", "--dim", "4096", "--rounds", "20", "--min-wait", "0.1", "--round-timeout", "0.3", "--sketch-dim", "256"]

    async def slow_from_round_1() -> None:
        await reached(run, topo.ids, 1)
        for j in (1, 3):
            proxy.set(2, j, both=False, delay=0.6)

    asyncio.run(run_routed(proxy, spawn, path, run, ["2", "0-1,3-7"], args, slow_from_round_1))
    assert sum(2 in r["late_neighbors"] for p in (1, 3) for r in records(run, p)) >= 12
    x0 = {p: synthetic_state(0, p, 4096) for p in topo.ids}
    assert drift(x0, finals(run, topo.ids)) < 1e-6
    assert_replicas_match(run, [(1, 2), (2, 3)])


@pytest.mark.slow
def test_partition_and_heal_of_a_ring_over_tcp(tmp_path, spawn):
    """Ring-16 in two processes of eight; the proxy cuts both links between the halves (7-8,
    15-0, connections left open) for 15 rounds, then heals. Rounds are paced (--round-period), so
    neither half runs more than --max-lag rounds ahead of the other. Each half keeps its rounds; after the
    heal the boundary replicas are bit-identical to their senders' public copies and exact
    consensus comes back within the spectral bound, counted from the round both ends are back."""
    topo, path, proxy = routed(tmp_path, "ring", 16, [(7, 8), (15, 0)])
    run = tmp_path / "run"
    rounds = 45
    args = ["--no-train", "--dim", "2048", "--rounds", str(rounds), "--min-wait", "0.1", "--round-timeout", "1", "--round-period", "0.2",
            "--peer-timeout", "1.5", "--heartbeat", "0.25", "--sketch-dim", "256", "--monitor-share", "0"]  # an estimate every round
    async def scenario() -> None:  # records trail the rounds by the flood's lag: these are rounds of records
        await reached(run, [7, 8], 2)
        cut = max(records(run, p)[-1]["round"] for p in (7, 8))
        proxy.cut([range(8), range(8, 16)])
        await reached(run, [7, 8], cut + 15)
        proxy.heal()

    asyncio.run(run_routed(proxy, spawn, path, run, ["0-7", "8-15"], args, scenario))
    recs = {p: records(run, p) for p in topo.ids}
    assert all([r["round"] for r in recs[p]] == list(range(rounds)) for p in topo.ids)  # nobody stalled or crashed
    # During the cut the boundary peers saw each other down and went on with one neighbour.
    alone = {p: [r["round"] for r in recs[p] if r["live_neighbors"] == 1] for p in (7, 8, 15, 0)}
    assert all(len(a) >= 10 and a == list(range(a[0], a[-1] + 1)) for a in alone.values()), alone
    healed = max(a[-1] for a in alone.values()) + 1
    back = max(min(r["round"] for r in recs[p] if r["round"] >= healed and r["live_neighbors"] == 2 and not r["late_neighbors"])
               for p in (7, 8, 15, 0))
    assert back <= healed + 5  # within a few rounds of the heal
    assert_replicas_match(run, [(7, 8), (15, 0)])
    xi_back = max(recs[p][back]["consensus_distance"] for p in topo.ids)  # the flooded estimate, all 16 sketches
    assert all(recs[p][back]["consensus_peers"] == 16 for p in topo.ids)
    xi = exact_distance(finals(run, topo.ids).values())
    assert xi <= topo.mixing_lambda() ** (rounds - 1 - back) * xi_back * 1.3


@pytest.mark.slow
def test_resets_on_one_link_apply_no_delta_twice_keep_the_mean_and_replicas_stay_exact(tmp_path, spawn):
    """Link 0-1 is reset every 1.5 s while ring-4 runs with every edge over TCP, each time after
    holding what it carries for 0.4 s, so that the reset loses deltas. A delta lost with its
    connection is a sequence gap: the replica asks for the missing deltas, which the sender
    still holds, never applies a delta twice or out of order, and ends bit-identical to the
    sender's copy. The rounds mixed without them are owed as for a late delta, so exact gossip
    keeps its mean (answered with a state, as before, it moved by X of its norm)."""
    topo, path, proxy = routed(tmp_path, "ring", 4, [(0, 1), (1, 2), (2, 3), (3, 0)])
    for a, b in ((0, 1), (1, 2), (2, 3), (3, 0)):
        proxy.set(a, b, delay=0.02, jitter=0.01)
    run = tmp_path / "run"
    rounds = 40
    args = ["--no-train", "--dim", "8192", "--rounds", str(rounds), "--min-wait", "0.2", "--round-timeout", "1",
            "--round-period", "0.15", "--sketch-dim", "256"]
    resets = []

    async def scenario() -> None:
        await reached(run, [0, 1], 2)
        while not records(run, 0) or records(run, 0)[-1]["round"] < rounds - 8:
            proxy.set(0, 1, delay=0.5)  # what enters the link now is still on it at the reset
            await asyncio.sleep(0.4)
            resets.append(proxy.reset(0, 1))
            proxy.set(0, 1, delay=0.02)
            await asyncio.sleep(1.1)

    asyncio.run(run_routed(proxy, spawn, path, run, ["0,2", "1,3"], args, scenario))
    assert sum(resets) >= 3
    recs = {p: records(run, p) for p in topo.ids}
    assert all([r["round"] for r in recs[p]] == list(range(rounds)) for p in topo.ids)
    assert all(recs[p][-1]["duplicates"] == 0 for p in topo.ids)
    assert recs[0][-1]["gaps_asked"] + recs[1][-1]["gaps_asked"] >= 1  # deltas were lost, and asked for again
    assert_replicas_match(run, [(0, 1), (1, 2), (2, 3), (3, 0)])
    x0 = {p: synthetic_state(0, p, 8192) for p in topo.ids}
    assert exact_distance(finals(run, topo.ids).values()) < 1e-3 * exact_distance(x0.values())
    assert drift(x0, finals(run, topo.ids)) < 1e-6


@pytest.mark.slow
def test_a_straggler_behind_a_one_megabit_link_paces_its_neighbours_within_the_deadline(tmp_path, spawn):
    """Peer 2's links carry 1 Mbit/s each way and a delta is 64 KB: half a second on the wire.
    Its neighbours wait for it, never past the round deadline's ceiling (--round-timeout), and it
    keeps up: every round is mixed, replicas stay exact and exact gossip keeps its mean."""
    topo, path, proxy = routed(tmp_path, "ring", 4, [(1, 2), (2, 3)])
    for j in (1, 3):
        proxy.set(2, j, rate=1e6 / 8)
    run = tmp_path / "run"
    timeout, rounds = 2.0, 8
    args = ["--no-train", "--dim", "16384", "--rounds", str(rounds), "--min-wait", "0.1", "--round-timeout", str(timeout),
            "--sketch-dim", "256"]
    asyncio.run(run_routed(proxy, spawn, path, run, ["2", "0-1,3"], args))
    recs = {p: records(run, p) for p in topo.ids}
    assert all([r["round"] for r in recs[p]] == list(range(rounds)) for p in topo.ids)
    waits = [r["wait_s"] for p in (1, 3) for r in recs[p][1:]]
    assert min(waits) >= 0.3 and max(waits) <= timeout + 0.5  # held back by the slow link, never past the deadline
    assert proxy.links[2, 1].bytes >= rounds * 64 * 1024  # the deltas went through the capped link
    x0 = {p: synthetic_state(0, p, 16384) for p in topo.ids}
    assert drift(x0, finals(run, topo.ids)) < 1e-6
    assert_replicas_match(run, [(1, 2), (2, 3)])
