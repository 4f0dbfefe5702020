"""Decentralized (gossip on a ring) vs centralized (pooled data) vs local-only training.

Same foundation model, adapter, data partition and optimizer steps per sample budget:
- decentralized: n trainers, each `local_steps` per round, then one CHOCO round (the real engine,
  in process: p2pfl.sim) on a ring;
- local-only: the same trainers without any mixing;
- centralized: one trainer on the union of the peers' training data, n * local_steps per round.
Accuracy is each trainer's accuracy on the shared global test set. Prints one JSON line.
usage: python bench/learning.py [--peers 8] [--rounds 30] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from p2pfl import topology as T
from p2pfl.sim import SimNetwork
from p2pfl.trainer import Trainer, TrainerConfig


def run_peers(cfg: TrainerConfig, n: int, rounds: int, mix: bool, kind: str, compress: str) -> dict:
    trainers = [Trainer(cfg, p, n) for p in range(n)]
    topo = T.generate(kind, n)
    net = SimNetwork(topo, {p: t.adapter_state() for p, t in enumerate(trainers)}, plan=compress) if mix else None
    for _ in range(rounds):
        for p, t in enumerate(trainers):
            t.train_round()
            if net is not None:
                net.engines[p].set_x(t.adapter_state())
        if net is not None:
            net.step()
            for p, t in enumerate(trainers):
                t.load_adapter_state(net.engines[p].x)
    accs = [t.evaluate(global_eval=True) for t in trainers]
    g = [a["global_accuracy"] for a in accs]
    out = {"global_accuracy_mean": float(np.mean(g)), "global_accuracy_min": float(np.min(g)),
           "local_accuracy_mean": float(np.mean([a["accuracy"] for a in accs]))}
    if net is not None:
        out["bytes_on_wire"] = net.bytes_sent
    return out


def run_central(cfg: TrainerConfig, n: int, rounds: int) -> dict:
    pooled = replace(cfg, partition="iid", samples_per_peer=cfg.samples_per_peer * n, local_steps=cfg.local_steps * n)
    t = Trainer(pooled, 0, 1)
    for _ in range(rounds):
        t.train_round()
    return {"global_accuracy": t.evaluate(global_eval=True)["global_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--compress", default="none")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = {"partition": "dirichlet:0.5"}
    for item in args.set:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    cfg = TrainerConfig.from_dict(overrides)
    t0 = time.time()
    zero = Trainer(cfg, 0, args.peers).evaluate(global_eval=True)["global_accuracy"]
    dec = run_peers(cfg, args.peers, args.rounds, True, args.topology, args.compress)
    loc = run_peers(cfg, args.peers, args.rounds, False, args.topology, args.compress)
    cen = run_central(cfg, args.peers, args.rounds)
    print(json.dumps({
        "bench": "learning", "peers": args.peers, "rounds": args.rounds, "topology": args.topology,
        "trainer": cfg.to_dict(), "zero_shot_global_accuracy": zero,
        "decentralized": dec, "local_only": loc, "centralized": cen,
        "gap_to_centralized_points": 100 * (cen["global_accuracy"] - dec["global_accuracy_mean"]),
        "gain_over_local_points": 100 * (dec["global_accuracy_mean"] - loc["global_accuracy_mean"]),
        "seconds": round(time.time() - t0, 1),
    }))


if __name__ == "__main__":
    main()
