"""What the consensus estimate costs: everything on the wire that is not delta payload (sketches,
headers, heartbeats, hellos, goodbyes, the drain rounds' deltas) within --monitor-share (0.25) of
the delta bytes, with estimates through the run (p2pfl/node/build.py, p2pfl/core/estimate.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pfl.config import PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.compress import CompressionPlan
from p2pfl.core.consensus import SketchBook, exact_distance
from p2pfl.core.estimate import MIN_FLOOD_ROWS, MIN_ROWS, ROW_KEY_BYTES, flood_plan
from p2pfl.core.gossip import ChocoEngine
from p2pfl.core.state import synthetic_state
from p2pfl.core.wire import Kind, encode, frames_nbytes
from p2pfl.host.files import read_jsonl
from p2pfl.node.build import flood_deliveries, wire_costs
from p2pfl.node.piggyback import ESTIMATE_TENSOR, FINGERPRINT_TENSOR, SKETCH_TENSOR
from p2pfl.sim.simulation import Simulation

from .conftest import ROOT, make_topology

DIM = 32768  # make run's adapter size: a sign:2048 delta is 4,160 bytes
BLOCKS = (SKETCH_TENSOR, ESTIMATE_TENSOR, FINGERPRINT_TENSOR)


@pytest.mark.parametrize("kind,n", [("ring", 8), ("ring", 7), ("exponential", 16), ("torus", 16)])
def test_flood_deliveries_count_what_the_sketch_book_sends(kind, n):
    """The rows one flooded sketch round puts on the wire, all origins, against SketchBook's own
    forwarding in synchronous rounds."""
    t = T.generate(kind, n)
    books = {p: SketchBook(p, t.ids, horizon=t.diameter() + 2) for p in t.ids}
    for p in t.ids:
        books[p].add(p, 1, torch.zeros(4))
    sent = 0
    for rnd in range(1, t.diameter() + 3):
        out = {(p, j): books[p].outgoing(j, rnd) for p in t.ids for j in t.neighbors(p)}
        for (p, j), rows in out.items():
            sent += len(rows)
            for origin, r, s in rows:
                books[j].add(origin, r, s, via=p)
    assert all(books[p].complete(1) for p in t.ids)
    assert flood_deliveries(frozenset(tuple(e) for e in t.graph.edges())) == sent


@pytest.mark.parametrize("deliveries,messages,diameter,k,budget,rounds", [
    (64, 16, 4, 1024, 631.0, 40), (64, 16, 4, 1024, 631.0, 10), (64, 16, 4, 256, 5000.0, 40),
    (4096, 128, 32, 1024, 600.0, 40), (1024, 64, 16, 1024, 631.0, 20), (64, 16, 4, 64, 100.0, 40),
    (64, 16, 4, 1024, 1e6, 40), (4096, 128, 32, 1024, 1.0, 40)])
def test_flood_plan_keeps_the_budget(deliveries, messages, diameter, k, budget, rounds):
    rows, every = flood_plan(deliveries, messages, diameter, k, budget, rounds, block_bytes=71)
    floods = (rounds - 1) // every + 1  # Monitor.sketched: the last round and every `every` before it
    per_flood = deliveries * (8 * rows + ROW_KEY_BYTES) / messages + diameter * 71
    assert floods * per_flood <= rounds * budget or rows == MIN_ROWS
    assert rows <= k and rows in {k >> s for s in range(11)}
    if rows < min(k, MIN_FLOOD_ROWS):  # below 128 only when the one flood a run gets would not fit
        assert floods == 1 and deliveries * (8 * 2 * rows + ROW_KEY_BYTES) / messages + diameter * 71 > rounds * budget
    elif rows < k:  # halved only while floods would come further apart than a flood takes to land
        assert deliveries * (8 * 2 * rows + ROW_KEY_BYTES) / messages + diameter * 71 > (diameter + 1) * budget
    assert flood_plan(deliveries, messages, diameter, k, 0.0, rounds) == (k, 1)  # --monitor-share 0


def test_every_peer_prices_its_messages_alike():
    """The budget sets the sketch rows, which every peer of a run must share: a peer's own id and
    incarnation (their msgpack sizes differ) must not move it."""
    plan = CompressionPlan.parse("sign:2048")
    x = synthetic_state(0, 0, DIM)
    costs = {wire_costs(ChocoEngine(me, {}, x, plan, 0.5, seed=0, inc=inc), net=7, rounds=40, sender=255)
             for me, inc in ((0, 1000), (200, 1_765_000_000_000_000))}
    assert len(costs) == 1
    c = costs.pop()
    assert c.payload == 4160 and 100 < c.header < 250 and 50 < c.control < 120 and 0 < c.block < 120


def simulate(kind: str, n: int, rounds: int, **settings) -> tuple[Simulation, dict[str, int]]:
    topo = T.generate(kind, n)
    cfg = PeerConfig(topology=Path(topo.name), id=0, rounds=rounds, compress="sign:2048", dim=DIM, seed=0, **settings)
    sim = Simulation(topo, cfg)
    tally = {"delta": 0, "other": 0}
    send = sim._send

    def counted(src, a):
        wire = frames_nbytes(encode(a.msg))
        delta = sum(tp.nbytes() for name, tp in a.msg.tensors.items() if name not in BLOCKS) if a.msg.kind == Kind.DELTA else 0
        tally["delta"] += delta
        tally["other"] += wire - delta
        send(src, a)

    sim._send = counted
    sim.run()
    return sim, tally


@pytest.mark.parametrize("kind,n,rounds,estimator,least", [
    ("ring", 8, 40, "auto", 4), ("ring", 32, 20, "auto", 1), ("exponential", 16, 24, "gossip", 2)])
def test_what_is_not_delta_costs_at_most_a_quarter(kind, n, rounds, estimator, least):
    """Every frame counted (the simulator sends what the wire would carry; its rounds take
    milliseconds, so heartbeats are few here: the launcher's test below has real ones). Ring-32 is
    the largest network --estimator auto floods."""
    sim, tally = simulate(kind, n, rounds, estimator=estimator)
    assert tally["other"] <= 0.25 * tally["delta"]
    recs = sim.records[0]
    estimated = [r["round"] for r in recs if r.get("consensus_distance") is not None and math.isfinite(r["consensus_distance"])]
    assert len(estimated) >= least and estimated[-1] == rounds - 1
    xi = exact_distance(sim.models().values())
    assert recs[-1]["consensus_distance"] == pytest.approx(xi, rel=0.10)


@pytest.mark.slow  # the launcher and its peer process, over loopback TCP
def test_launched_run_counts_everything_within_a_quarter(tmp_path):
    topo, path = make_topology(tmp_path, "ring", 4)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "p2pfl.ops.launch", str(path), "--run-dir", str(run), "--processes", "1",
                           "--rounds", "24", "--no-report", "--", "--no-train", "--dim", str(DIM), "--compress", "sign:2048"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    recs = {p: read_jsonl(run / "metrics" / f"peer-{p}.jsonl") for p in topo.ids}
    delta = sum(r["payload_bytes"] * r["live_neighbors"] for rs in recs.values() for r in rs)
    assert summary["bytes_sent_total"] - delta <= 0.25 * delta
    estimated = [r["round"] for r in recs[0] if r.get("consensus_distance") is not None]
    assert len(estimated) >= 3 and estimated[-1] == 23
