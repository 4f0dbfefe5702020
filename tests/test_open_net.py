"""An open network over real processes and loopback TCP (`p2pfl-peer --network`, CURVE with
admission certificates): 32 peers in 4 processes that know only peer 0's address join and
gossip exactly; churn (joins, goodbyes, crashes) mid-run; a revocation given to one process
reaches every peer through the others."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import networkx as nx
import pytest
import torch

from p2pfl.core.consensus import flatten
from p2pfl.core.membership.size import relative_std
from p2pfl.core.state import synthetic_state
from p2pfl.host.checkpoint import load_state, read
from p2pfl.ops import open_launch as O
from p2pfl.ops.cli import topology_main
from p2pfl.ops.launch import spread
from tests.conftest import records, wait_all, wait_until

HOST = "127.0.0.1"
DIM = 1024
SETTINGS = {"dim": DIM, "compress": "none", "sketch_dim": 0, "round_period": 0.3, "min_wait": 1.0, "heartbeat": 0.5,
            "peer_timeout": 3.0, "checkpoint_every": 10}
MEMBERSHIP = {"request_timeout": 2.0}  # rewires settle within a few seconds of the last join


def network(run: Path, rounds: int, first_block: int) -> int:
    run.mkdir(parents=True)
    return O.create(run, {**SETTINGS, "rounds": rounds}, HOST, first_block, MEMBERSHIP)


def site(spawn, run: Path, ids: list[int], port: int | None = None, revocations: bool = False):
    pr = O.start(run, ids, O.certify(run, ids, f"site-{ids[0]}"), HOST, [], port, revocations)
    spawn.started.append(pr)  # killed with its group when the test ends
    return pr


def spread_of(x: torch.Tensor) -> float:
    return float((x - x.mean(0)).norm(dim=1).pow(2).mean().sqrt())


def models_at(run: Path, peers: list[int], rnd: int, procs) -> torch.Tensor:
    """The peers' models of their checkpoint of round `rnd` (--checkpoint-every 10: rnd = 9, 19,
    ...), each read as soon as it is written: a peer keeps only its last two."""
    got: dict[int, torch.Tensor] = {}

    def take() -> bool:
        for p in peers:
            if p not in got and (run / f"peer-{p}" / f"checkpoint-{rnd:08d}.sha256").exists():
                c = read(run / f"peer-{p}" / f"checkpoint-{rnd:08d}.safetensors")
                got[p] = torch.cat([c.tensors[n].flatten().double() for n in sorted(c.tensors) if n.startswith("x/")])
        return len(got) == len(peers)

    wait_until(take, 200, f"every peer's checkpoint of round {rnd}", procs)
    return torch.stack([got[p] for p in peers])


def final_models(run: Path, peers: list[int]) -> torch.Tensor:
    return torch.stack([flatten(load_state(run / f"peer-{p}" / "adapter.safetensors")).double() for p in peers])


def overlay(recs: dict[int, list[dict]], rnd: int) -> nx.Graph:
    """The overlay of round `rnd` from the records: peers with a record of it, linked where both hold the link."""
    at = {p: r for p, rs in recs.items() for r in rs if r["round"] == rnd}
    g = nx.Graph()
    g.add_nodes_from(at)
    g.add_edges_from((p, q) for p, r in at.items() for q in r["active"] if q in at and p in at[q]["active"])
    return g


@pytest.mark.slow
@pytest.mark.serial  # overlay convergence in time: other tests' load changes links past round 59 and delays joiners
def test_32_peers_in_4_processes_join_through_peer_0_and_gossip_exactly(spawn, tmp_path):
    n, rounds = 32, 80
    blocks = spread(list(range(n)), 4)
    run = tmp_path / "run"
    port = network(run, rounds, len(blocks[0]))
    procs = {b[0]: site(spawn, run, b, port if b[0] == 0 else None) for b in blocks}
    x1 = models_at(run, list(range(n)), 59, procs.values())
    assert wait_all(procs, 400) == dict.fromkeys(procs, 0)
    recs = {p: records(run, p) for p in range(n)}
    assert all(recs[p][-1]["round"] == rounds - 1 for p in range(n))  # joiners start at the network's round
    first_mix = {p: next(r["round"] for r in recs[p] if r["mixed_with"]) for p in range(n)}
    assert max(first_mix.values()) <= 20, first_mix  # every peer joined and mixes
    # The overlay of the last round every peer recorded before the first one finished (a peer that
    # finishes says goodbye, and its neighbours still in their last rounds drop it).
    end = min(recs[p][-1]["time"] for p in range(n))
    settled = max(r for r in range(rounds) if all(any(x["round"] == r and x["time"] < end for x in recs[p]) for p in range(n)))
    assert settled >= rounds - 10, settled
    g = overlay(recs, settled)
    assert g.number_of_nodes() == n and nx.is_connected(g)
    at = {p: next(r for r in recs[p] if r["round"] == settled) for p in range(n)}
    assert all(set(at[p]["active"]) == set(g[p]) for p in range(n))  # every link held at both ends
    assert max(d for _, d in g.degree) <= 5
    for p in range(n):  # the size estimate without knowing n, within three of its standard deviations
        assert abs(recs[p][-1]["network_size_estimate"] / n - 1) <= 3 * relative_std(64), recs[p][-1]["network_size_estimate"]
    x0 = torch.stack([flatten(synthetic_state(0, p, DIM)).double() for p in range(n)])
    xT = final_models(run, list(range(n)))
    assert spread_of(xT) <= 1e-3 * spread_of(x0), (spread_of(xT), spread_of(x0))
    # While membership is stable (no active view changes from round 59 on) exact gossip keeps the
    # network mean: W is symmetric and doubly stochastic over the live links.
    assert all(len({tuple(r["active"]) for r in recs[p] if 59 <= r["round"] <= settled}) == 1 for p in range(n)), "an active view changed"
    drift = float((xT.mean(0) - x1.mean(0)).norm() / x1.mean(0).norm())
    print(f"every peer mixes by round {max(first_mix.values())}; consensus distance {spread_of(xT) / spread_of(x0):.2e} of its start; "
          f"mean moved {drift:.1e} of its norm from round 59 to the end")
    assert drift <= 1e-5, drift


@pytest.mark.slow
@pytest.mark.serial  # overlay convergence in time: other tests' load changes links past round 59 and delays joiners
def test_churn_joins_goodbyes_and_crashes_keep_the_overlay_connected(spawn, tmp_path):
    """24 peers (two processes of 8, and 8 peers alone in a process each), 8 more join mid-run in
    one process, 4 leave with SIGTERM and 4 are SIGKILLed."""
    rounds = 90
    run = tmp_path / "run"
    port = network(run, rounds, 8)
    procs = {0: site(spawn, run, list(range(8)), port)}
    procs[8] = site(spawn, run, list(range(8, 16)))
    for p in range(16, 24):
        procs[p] = site(spawn, run, [p])
    last = lambda p: (records(run, p) or [{"round": -1}])[-1]["round"]  # noqa: E731
    wait_until(lambda: last(0) >= 10, 200, "round 10", procs.values())
    procs[24] = site(spawn, run, list(range(24, 32)))
    wait_until(lambda: last(0) >= 30 and all(records(run, p) for p in range(24, 32)), 200, "the joiners' first rounds", procs.values())
    for p in range(16, 20):
        procs[p].send_signal(signal.SIGTERM)
    for p in range(20, 24):
        procs[p].send_signal(signal.SIGKILL)
    gone = set(range(16, 24))
    live = [p for p in range(32) if p not in gone]
    x1, x2 = (models_at(run, live, rnd, [procs[k] for k in (0, 8, 24)]) for rnd in (39, 49))
    codes = wait_all(procs, 400)
    assert all(codes[k] == 0 for k in (0, 8, 24, 16, 17, 18, 19)), codes  # no live peer waits forever; goodbyes exit cleanly
    recs = {p: records(run, p) for p in range(32)}
    assert all(recs[p][-1]["round"] == rounds - 1 for p in live)
    # Joiners start at the network's round and mix within 3 rounds of their first, or 4 s where
    # rounds are shorter (these are 0.3 s: the 8 join at once through one contact and evict one
    # another at the walks' ends; docs/membership.md has the rounds each took).
    for p in range(24, 32):
        first = recs[p][0]
        mixed = next(r for r in recs[p] if r["mixed_with"])
        assert first["round"] >= 10 and (mixed["round"] <= first["round"] + 3 or mixed["time"] - first["time"] <= 4.0), \
            (p, first["round"], mixed["round"], mixed["time"] - first["time"])
    # Every round's records are consistent with a connected overlay: the peers with a record of the
    # round (a joiner from its fourth), linked where either end names the link (the two ends record
    # a change a moment apart), from the round every first peer runs to the end.
    first = {p: recs[p][0]["round"] for p in recs}
    for rnd in range(max(first[p] for p in range(24)), rounds):
        at = {p: r for p, rs in recs.items() for r in rs if r["round"] == rnd and (p < 24 or rnd > first[p] + 3)}
        g = nx.Graph()
        g.add_nodes_from(at)
        g.add_edges_from((p, q) for p, r in at.items() for q in r["active"] if q in at)
        assert nx.is_connected(g), (rnd, [sorted(c) for c in nx.connected_components(g)])
    settled = max(r["round"] for p in live for r in recs[p] if set(r["active"]) & gone)  # the dead are out of every view
    assert settled < rounds - 20, settled
    # Consensus among the live peers keeps contracting after the churn.
    print(f"live peers' consensus distance: {spread_of(x1):.3e} at round 39, {spread_of(x2):.3e} at round 49, "
          f"{spread_of(final_models(run, live)):.3e} at the end; the dead out of every view after round {settled}")
    assert settled < 39 and spread_of(x2) < 0.2 * spread_of(x1), (settled, spread_of(x1), spread_of(x2))


@pytest.mark.slow
def test_a_revocation_given_to_one_process_cuts_the_peer_off_everywhere(spawn, tmp_path):
    rounds, revoked = 60, 6
    run = tmp_path / "run"
    port = network(run, rounds, 4)
    procs = {0: site(spawn, run, [0, 1, 2, 3], port, revocations=True), 4: site(spawn, run, [4, 5, 6, 7])}
    last = lambda p: (records(run, p) or [{"round": -1}])[-1]["round"]  # noqa: E731
    wait_until(lambda: min(last(p) for p in range(8)) >= 10, 200, "round 10 everywhere", procs.values())
    assert any(revoked in r["active"] for p in range(8) if p != revoked for r in records(run, p)[-1:])
    assert topology_main(["authority", "revoke", "--dir", str(run / "authority"), str(revoked), "-o", str(run / "revocations.txt")]) == 0
    written = time.time()
    assert wait_all(procs, 300) == {0: 0, 4: 0}
    for p in range(8):
        if p == revoked:
            continue
        recs = records(run, p)
        after = [r for r in recs if r["time"] > written + 2.0]  # the file is read within a second, then one flood
        assert len(after) > 10 and not any(revoked in r["active"] or revoked in r["mixed_with"] for r in after), p
    refused = records(run, 0)[-1]["admission_refused"]
    assert refused.get("revoked", 0) > 0, refused  # its messages still come, and are refused at the socket


@pytest.mark.parametrize("argv, message", [
    (["--topology", "topologies/ring.yaml", "--id", "0", "--cert", "x"], "--cert: only with --network"),
    (["--network", "{net}", "--listen", "127.0.0.1:1"], "--cert: required with --network"),
    (["--network", "{net}", "--cert", "{cert}"], "--listen: required with --network"),
    (["--network", "{net}", "--cert", "{cert}", "--listen", "127.0.0.1:1", "--id", "3"], "--id: an open network's peer ids come from"),
    (["--network", "{net}", "--cert", "{cert}", "--listen", "127.0.0.1"], "--listen: expected HOST:PORT"),
    (["--network", "{net}", "--cert", "{cert}", "--listen", "127.0.0.1:1", "--algorithm", "gt"], "--algorithm gt: not available"),
    (["--network", "{net}", "--cert", "{cert}", "--listen", "127.0.0.1:1", "--resume"], "--resume (its links changed"),
    (["--network", "{net}", "--cert", "{other}", "--listen", "127.0.0.1:1"], "line 1: other-authority"),
    (["--network", "{net}", "--cert", "{nokey}", "--listen", "127.0.0.1:1"], "cannot load CurveZMQ secret key"),
    (["--network", "{net}", "--cert", "{cert}", "--listen", "127.0.0.1:1", "--set", "no_train=1"], "unknown trainer key"),
])
def test_an_open_peer_refuses_bad_flags_and_certificates_with_exit_2(tmp_path, capsys, argv, message):
    from p2pfl.ops.cli import peer_main

    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    O.create(run, {"dim": 128}, HOST, 2)
    O.create(other, {"dim": 128}, HOST, 2)
    cert = O.certify(run, [1], "one")
    nokey = O.certify(run, [2], "two")
    (run / "certs" / "keys" / "peer-2.key_secret").unlink()
    names = {"net": run / "network.yaml", "cert": cert, "other": O.certify(other, [1], "one"), "nokey": nokey}
    assert peer_main([a.format(**names) for a in argv]) == 2
    assert message in capsys.readouterr().err
