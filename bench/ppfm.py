"""PPFM vs flat gossip vs local-only on planted task groups: personalised accuracy and bytes.

Same peers, data, trainer and rounds for all three; only what is gossiped differs:
  flat   one CHOCO engine on the base graph: every peer ends with (nearly) one global model;
  ppfm   the daemon's rounds with PPFM on (p2pfl.sim.simulation: real nodes, engines, wire encoding,
         fingerprint flooding): clusters found from fingerprints, cluster models on overlays,
         global model among representatives every K rounds;
  local  no communication.
A peer's personalised accuracy is its model's accuracy on a held-out test set of its own group
(task/domain); for ppfm also the representatives' global model on the same sets. Bytes are wire
bytes of everything the method sends (for ppfm: cluster and global deltas, STATE resyncs and the
flooded fingerprints, and the base-channel messages that pace the rounds).

    .venv/bin/python bench/ppfm.py [--topology topologies/clusters.yaml] [--rounds 20] [--set KEY=VALUE ...]
prints one JSON line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, trainer_config
from sklearn.metrics import adjusted_rand_score

from p2pfl.core import topology as T
from p2pfl.host.files import load_topology
from p2pfl.learn.trainer import Trainer
from p2pfl.sim.simulation import train_network


def accuracy(t: Trainer, state: dict[str, torch.Tensor]) -> float:
    t.load_adapter_state(state)
    return t.evaluate(global_eval=True)["global_accuracy"]


def summary(acc: dict[int, float]) -> dict[str, float]:
    v = list(acc.values())
    return {"mean": round(float(np.mean(v)), 4), "worst": round(float(np.min(v)), 4)}


def final(sim, topo: T.Topology, key: str = "global_accuracy") -> dict[int, float]:
    return {p: sim.records[p][-1][key] for p in topo.ids}


def run_flat(topo: T.Topology, trainers: dict[int, Trainer], rounds: int) -> tuple[dict[int, float], int]:
    sim = train_network(topo, trainers, rounds, sketch_dim=0)
    return final(sim, topo), sum(sim.bytes_sent.values())


def run_ppfm(topo: T.Topology, trainers: dict[int, Trainer], rounds: int, ppfm: dict) -> dict:
    sim = train_network(topo, trainers, rounds, sketch_dim=0, **ppfm)
    first = topo.ids[0]
    split_at = next((r["round"] for r in sim.records[first] if r["clusters"] > 1), None)
    labels = {p: sim.records[p][-1]["cluster_labels"] for p in topo.ids}
    reps = sorted({sim.records[p][-1]["representative"] for p in topo.ids})
    theta_g = sim.nodes[reps[0]].mixer.levels.glob.x  # what the representatives agreed on (exact gossip: the same on each)
    truth = [trainers[p].data.group for p in topo.ids]
    return {
        "personalised": final(sim, topo),
        "global_model": {p: accuracy(t, theta_g) for p, t in trainers.items()},
        "bytes": sum(sim.bytes_sent.values()),
        "bytes_by_level": sim.channel_bytes,
        "clusters": labels[first],
        "all_peers_agree": all(v == labels[first] for v in labels.values()),
        "ari_vs_planted": round(float(adjusted_rand_score(truth, labels[first])), 4),
        "split_at_round": split_at,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", type=Path, default=Path("topologies/clusters.yaml"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clusters", default="auto")
    ap.add_argument("--recluster-every", type=int, default=5)
    ap.add_argument("--global-every", type=int, default=5)
    ap.add_argument("--lam", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option over the topology's")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    topo = load_topology(args.topology)
    cfg = trainer_config(args.set, **{"seed": 0, **(topo.settings.get("trainer") or {})})
    ppfm_cfg = {"clusters": args.clusters, "recluster_every": args.recluster_every, "global_every": args.global_every,
                "global_lambda": args.lam, "cluster_beta": args.beta}

    def fresh() -> dict[int, Trainer]:
        return {p: Trainer(cfg, p, topo.n) for p in topo.ids}

    t0 = time.time()
    trainers = fresh()
    zero_shot = {p: t.evaluate(global_eval=True)["global_accuracy"] for p, t in trainers.items()}
    flat, flat_bytes = run_flat(topo, trainers, args.rounds)
    ppfm = run_ppfm(topo, fresh(), args.rounds, ppfm_cfg)
    trainers = fresh()
    for _ in range(args.rounds):
        for t in trainers.values():
            t.train_round()
    local = {p: t.evaluate(global_eval=True)["global_accuracy"] for p, t in trainers.items()}
    out = {
        "bench": "ppfm",
        "topology": topo.name,
        "peers": topo.n,
        "rounds": args.rounds,
        "partition": cfg.partition,
        "ppfm": {"clusters": args.clusters, "R": args.recluster_every, "K": args.global_every, "lambda": args.lam, "beta": args.beta},
        "zero_shot": summary(zero_shot),
        "flat": {**summary(flat), "bytes": flat_bytes},
        "ppfm_personalised": {**summary(ppfm["personalised"]), "bytes": ppfm["bytes"], "bytes_by_level": ppfm["bytes_by_level"]},
        "ppfm_global_model": summary(ppfm["global_model"]),
        "local": {**summary(local), "bytes": 0},
        "ppfm_minus_flat": {"mean": round(float(np.mean(list(ppfm["personalised"].values())) - np.mean(list(flat.values()))), 4),
                            "worst": round(min(ppfm["personalised"].values()) - min(flat.values()), 4)},
        "bytes_ppfm_over_flat": round(ppfm["bytes"] / flat_bytes, 3),
        "clusters": ppfm["clusters"],
        "all_peers_agree": ppfm["all_peers_agree"],
        "ari_vs_planted": ppfm["ari_vs_planted"],
        "split_at_round": ppfm["split_at_round"],
        "per_peer": {"flat": flat, "ppfm": ppfm["personalised"], "local": local},
        "seconds": round(time.time() - t0, 1),
    }
    emit(out)


if __name__ == "__main__":
    main()
