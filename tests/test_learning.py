"""A launched cluster really learns: gossip beats training alone on skewed data."""

import numpy as np
import pytest
import torch

from p2pfl.host.files import read_jsonl
from p2pfl.learn.trainer import Trainer, TrainerConfig

from .conftest import make_topology, wait_all

SETTINGS = {"partition": "dirichlet:0.1", "local_steps": 5, "eval_every": 5}
ROUNDS = 20


@pytest.mark.slow
def test_ring4_gossip_beats_local_only_on_dirichlet_skew(tmp_path, cluster_dir, spawn):
    topo, path = make_topology(tmp_path, "ring", 4)
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v!r}".replace("'", '"'))]
    blocks = ["0,1", "2,3"]  # two processes of two co-hosted peers: two ring edges in process, two over TCP
    procs = {b: spawn(path, b, cluster_dir, "--rounds", str(ROUNDS), "--min-wait", "30", *sets) for b in blocks}
    assert wait_all(procs, timeout=400) == {b: 0 for b in blocks}
    gossip = []
    for p in topo.ids:
        recs = read_jsonl(cluster_dir / "metrics" / f"peer-{p}.jsonl")
        assert [r["round"] for r in recs] == list(range(ROUNDS))
        assert all(np.isfinite(r["train_loss"]) for r in recs)
        gossip.append(recs[-1]["global_accuracy"])

    torch.set_num_threads(1)
    cfg = TrainerConfig.from_dict({**SETTINGS, "seed": 0})
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
