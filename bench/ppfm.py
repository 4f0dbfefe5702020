"""PPFM vs flat gossip vs local-only on planted task groups: personalised accuracy and bytes.

Same peers, data, trainer and rounds for all three; only what is gossiped differs:
  flat   one CHOCO engine on the base graph: every peer ends with (nearly) one global model;
  ppfm   the PPFM levels (p2pfl.ppfm_sim: real engines, wire encoding, fingerprint flooding):
         clusters found from fingerprints, cluster models on overlays, global model among
         representatives every K rounds;
  local  no communication.
A peer's personalised accuracy is its model's accuracy on a held-out test set of its own group
(task/domain); for ppfm also the representatives' global model on the same sets. Bytes are wire
bytes of everything the method sends (for ppfm: cluster and global deltas, STATE resyncs and the
flooded fingerprints; not the daemon's small base-channel sync messages).

    .venv/bin/python bench/ppfm.py [--topology topologies/clusters.yaml] [--rounds 20] [--set KEY=VALUE ...]
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pfl import topology as T
from p2pfl.ppfm import PpfmConfig, parse_clusters
from p2pfl.ppfm_sim import PpfmNetwork, flat_gossip
from p2pfl.trainer import Trainer, TrainerConfig


def accuracy(t: Trainer, state: dict[str, torch.Tensor]) -> float:
    t.load_adapter_state(state)
    return t.evaluate(global_eval=True)["global_accuracy"]


def summary(acc: dict[int, float]) -> dict[str, float]:
    v = list(acc.values())
    return {"mean": round(float(np.mean(v)), 4), "worst": round(float(np.min(v)), 4)}


def run_flat(topo: T.Topology, trainers: dict[int, Trainer], rounds: int) -> tuple[dict[int, float], int]:
    net = flat_gossip(topo, trainers, rounds)
    return {p: accuracy(t, net.engines[p].x) for p, t in trainers.items()}, net.bytes_sent


def run_ppfm(topo: T.Topology, trainers: dict[int, Trainer], rounds: int, cfg: PpfmConfig) -> dict:
    net = PpfmNetwork(topo, {p: t.adapter_state() for p, t in trainers.items()}, cfg)

    def train(p: int, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trainers[p].load_adapter_state(theta)
        trainers[p].train_round()
        return trainers[p].adapter_state()

    split_at = None
    for r in range(rounds):
        net.step(train)
        if split_at is None and len(set(net.levels[topo.ids[0]].labels.values())) > 1:
            split_at = r
    labels = net.labels()
    first = labels[topo.ids[0]]
    reps = sorted({lv.rep for lv in net.levels.values()})
    theta_g = net.levels[reps[0]].glob.x  # what the representatives agreed on (exact gossip: the same on each)
    truth = [trainers[p].data.group for p in topo.ids]
    return {
        "personalised": {p: accuracy(t, net.levels[p].model()) for p, t in trainers.items()},
        "global_model": {p: accuracy(t, theta_g) for p, t in trainers.items()},
        "bytes": sum(net.bytes_sent.values()),
        "bytes_by_level": net.bytes_sent,
        "clusters": [first[p] for p in topo.ids],
        "all_peers_agree": all(v == first for v in labels.values()),
        "ari_vs_planted": round(float(adjusted_rand_score(truth, [first[p] for p in topo.ids])), 4),
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
    topo = T.load(args.topology)
    settings = dict(topo.settings.get("trainer", {}) or {})
    for item in args.set:
        k, _, v = item.partition("=")
        try:
            settings[k] = json.loads(v)
        except json.JSONDecodeError:
            settings[k] = v
    cfg = TrainerConfig.from_dict({"seed": 0, **settings})
    k = parse_clusters(args.clusters)
    ppfm_cfg = PpfmConfig(k=k if k is not None else "auto", recluster_every=args.recluster_every, global_every=args.global_every,
                          lam=args.lam, beta=args.beta, lag=topo.diameter() + 1)

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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
