"""PPFM over real processes and loopback TCP: peers find the planted groups and personalise.

Six peers on a ring that alternates the two planted task groups (shape: peers 0-2, background:
peers 3-5), so no group has a base-graph edge inside it and every cluster-level delta travels on
an overlay link the daemon opens itself. They run in two processes of three co-hosted peers, so
the overlay links are partly in process and partly TCP. Flat gossip (one model for everyone) is
the same trainer and rounds with exact CHOCO on the same ring: the daemon's rounds with
--clusters off, in the simulator. That a homogeneous group is never split is a decision of the
rounds alone, checked in the simulator.
"""

import networkx as nx
import numpy as np
import pytest
import torch

from p2pfl.core.topology import PeerSpec, Topology
from p2pfl.host.files import dump_topology, read_jsonl
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.sim.simulation import train_network

from .conftest import Spawner, free_base_port, wait_all

SETTINGS = {"local_steps": 5, "samples_per_peer": 128, "global_test_size": 300, "eval_every": 5}
ROUNDS = 20
N = 6
MARGIN = 0.03  # PPFM's mean personalised accuracy must beat flat gossip by at least 3 points


def ring(order: list[int], path) -> Topology:
    base = free_base_port(len(order))
    g = nx.Graph()
    g.add_edges_from(zip(order, order[1:] + order[:1], strict=True))
    topo = Topology(peers={p: PeerSpec(p, "127.0.0.1", base + p) for p in order}, graph=g, name="ppfm-ring")
    dump_topology(topo, path)
    return topo


def launch(spawn: Spawner, topo: Topology, path, run_dir, settings: dict, blocks: list[str]) -> dict[int, list[dict]]:
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v!r}".replace("'", '"'))]
    args = ["--rounds", str(ROUNDS), "--clusters", "auto", "--min-wait", "30", "--peer-timeout", "60", *sets]
    procs = {b: spawn(path, b, run_dir, *args) for b in blocks}
    assert wait_all(procs, timeout=600) == {b: 0 for b in blocks}
    return {p: read_jsonl(run_dir / "metrics" / f"peer-{p}.jsonl") for p in topo.ids}


@pytest.mark.slow
def test_planted_task_groups_are_found_and_beat_flat_gossip(tmp_path, cluster_dir, spawn):
    path = tmp_path / "ring.yaml"
    topo = ring([0, 3, 1, 4, 2, 5], path)
    settings = {**SETTINGS, "partition": "groups:task=shape,background"}
    recs = launch(spawn, topo, path, cluster_dir, settings, ["0,3,1", "4,2,5"])  # ring neighbours together
    truth = [p * 2 // N for p in topo.ids]
    for p, rs in recs.items():
        assert [r["round"] for r in rs] == list(range(ROUNDS))
        last = rs[-1]
        assert last["cluster_labels"] == truth, (p, last["cluster_labels"])  # every peer: the planted split
        assert last["cluster_size"] == 3 and last["representative"] == 3 * truth[p]
        assert set(last["overlay_neighbors"]) - set(topo.neighbors(p))  # links the base ring lacks
        assert last["rejected_messages"] == 0, last["rejected_by_reason"]
        assert last["cluster_consensus_distance"] < last["global_consensus_distance"]
    split = [next(r["round"] for r in rs if r["clusters"] == 2) for rs in recs.values()]
    assert len(set(split)) == 1  # all peers adopted the split in the same round
    at = next(r for r in recs[0] if r["round"] == split[0])  # the evaluation that split: it cleared both bars
    assert at["cluster_evaluated_round"] == split[0] and at["cluster_best_split_silhouette"] >= at["cluster_split_bar"]
    reps = [p for p in topo.ids if recs[p][-1]["representative"] == p]
    assert all(any("global_model_accuracy" in r for r in recs[p]) for p in reps)
    ppfm = [recs[p][-1]["global_accuracy"] for p in topo.ids]

    torch.set_num_threads(1)
    cfg = TrainerConfig.from_dict({**settings, "seed": 0})
    trainers = {p: Trainer(cfg, p, N) for p in topo.ids}
    sim = train_network(topo, trainers, ROUNDS, sketch_dim=0)
    flat = [sim.records[p][-1]["global_accuracy"] for p in topo.ids]
    assert np.mean(ppfm) > np.mean(flat) + MARGIN, (ppfm, flat)


@pytest.mark.slow
def test_one_homogeneous_group_is_not_split(tmp_path):
    topo = ring(list(range(N)), tmp_path / "ring.yaml")
    torch.set_num_threads(1)
    cfg = TrainerConfig.from_dict({**SETTINGS, "partition": "iid", "local_steps": 3, "seed": 0})
    sim = train_network(topo, {p: Trainer(cfg, p, N) for p in topo.ids}, ROUNDS, clusters="auto")
    for p, rs in sim.records.items():
        assert [r["round"] for r in rs] == list(range(ROUNDS))
        assert all(r["cluster_labels"] == [0] * N for r in rs), p
        assert rs[-1]["rejected_messages"] == 0
        evaluated = [r for r in rs if r["cluster_evaluated_round"] is not None]  # auto's bar kept one cluster
        assert evaluated and all(r["cluster_held_quality"] == r["cluster_split_bar"] for r in evaluated)
