"""Decentralized learning works: on skewed data, gossip beats training alone.

Four peers on a ring in the simulator (`p2pfl.sim.simulation`), which runs the daemon's own node:
what is checked is learning, not the number of processes. That training over real processes and
TCP gives the same losses and accuracies as in one process is tests/test_layouts.py's claim."""

import numpy as np

from p2pfl.core import topology as T
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.sim.simulation import train_network

ROUNDS = 10
SETTINGS = {"partition": "dirichlet:0.1", "local_steps": 5, "batch_size": 16, "global_test_size": 200, "eval_every": ROUNDS}


def test_ring4_gossip_beats_local_only_on_dirichlet_skew():
    topo = T.generate("ring", 4)
    cfg = TrainerConfig.from_dict({**SETTINGS, "seed": 0})
    sim = train_network(topo, {p: Trainer(cfg, p, topo.n) for p in topo.ids}, ROUNDS, sketch_dim=0)
    gossip = []
    for recs in sim.records.values():
        assert [r["round"] for r in recs] == list(range(ROUNDS))
        assert all(np.isfinite(r["train_loss"]) for r in recs)
        gossip.append(recs[-1]["global_accuracy"])

    alone, before = [], []
    for p in topo.ids:
        t = Trainer(cfg, p, topo.n)
        before.append(t.evaluate(global_eval=True)["global_accuracy"])
        for _ in range(ROUNDS):
            t.train_round()
        alone.append(t.evaluate(global_eval=True)["global_accuracy"])
    # Same peers, data, steps and optimizer; the only difference is the gossip.
    assert np.mean(gossip) > np.mean(alone) + 0.05, (gossip, alone)
    assert np.mean(gossip) > np.mean(before) + 0.15, (gossip, before)
