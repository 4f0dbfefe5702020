"""Decentralized (gossip on a ring) vs centralized (pooled data) vs local-only training.

Same foundation model, adapter, data partition and optimizer steps per sample budget:
- decentralized: n trainers, each `local_steps` per round, then one CHOCO round: the daemon's own
  rounds (`p2pfl.node.node`) in the discrete-event simulator `p2pfl.sim.simulation`, on a ring or another graph;
- local-only: the same trainers without any mixing;
- centralized: one trainer on the union of the peers' training data, n * local_steps per round.
Accuracy is each trainer's accuracy on the shared global test set. With ``--compress SPEC`` the
decentralized run gossips compressed deltas and is repeated uncompressed, to report the byte
reduction and the accuracy cost. Prints one JSON line.
usage: python bench/learning.py [--peers 8] [--rounds 30] [--topology ring] [--compress SPEC]
                                [--only dec,loc,cen,cenlb] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from p2pfl.core import topology as T
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.sim.simulation import train_network


def run_peers(cfg: TrainerConfig, n: int, rounds: int, mix: bool, kind: str, compress: str) -> dict:
    """n peers of `kind`, `rounds` rounds; with `mix` the daemon's rounds, else local steps only."""
    t0 = time.time()
    trainers = {p: Trainer(replace(cfg, eval_every=rounds), p, n) for p in range(n)}
    out: dict = {}
    if mix:
        sim = train_network(T.generate(kind, n), trainers, rounds, compress=compress, sketch_dim=0)
        accs = [sim.records[p][-1] for p in range(n)]
        out["bytes_on_wire"] = sum(sim.bytes_sent.values())
        out["bytes_per_peer_per_round"] = out["bytes_on_wire"] / (n * rounds)
    else:
        for _ in range(rounds):
            for t in trainers.values():
                t.train_round()
        accs = [t.evaluate(global_eval=True) for t in trainers.values()]
    g = [a["global_accuracy"] for a in accs]
    out.update(global_accuracy_mean=float(np.mean(g)), global_accuracy_min=float(np.min(g)),
               local_accuracy_mean=float(np.mean([a["accuracy"] for a in accs])), seconds=round(time.time() - t0, 1))
    return out


def run_central(cfg: TrainerConfig, n: int, rounds: int, large_batch: bool) -> dict:
    pooled = replace(cfg, partition="iid", samples_per_peer=cfg.samples_per_peer * n)
    if large_batch:
        pooled = replace(pooled, batch_size=cfg.batch_size * n)
    else:
        pooled = replace(pooled, local_steps=cfg.local_steps * n)
    t0 = time.time()
    t = Trainer(pooled, 0, 1)
    for _ in range(rounds):
        t.train_round()
    return {"global_accuracy": t.evaluate(global_eval=True)["global_accuracy"], "seconds": round(time.time() - t0, 1)}


def trainer_config(items: list[str]) -> TrainerConfig:
    """The bench's trainer settings (Dirichlet 0.5 label skew) with KEY=VALUE overrides (JSON values)."""
    overrides: dict = {"partition": "dirichlet:0.5"}
    for item in items:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    return TrainerConfig.from_dict(overrides)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--compress", default="none")
    ap.add_argument("--only", default="dec,loc,cen,cenlb")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = trainer_config(args.set)
    t0 = time.time()
    parts = set(args.only.split(","))
    out: dict = {"bench": "learning", "peers": args.peers, "rounds": args.rounds, "topology": args.topology,
                 "compress": args.compress, "trainer": cfg.to_dict(),
                 "zero_shot_global_accuracy": Trainer(cfg, 0, args.peers).evaluate(global_eval=True)["global_accuracy"]}
    if "dec" in parts:
        out["decentralized"] = run_peers(cfg, args.peers, args.rounds, True, args.topology, args.compress)
    if "dec" in parts and args.compress != "none":  # the same run uncompressed: bytes and accuracy to compare with
        ref = run_peers(cfg, args.peers, args.rounds, True, args.topology, "none")
        out["decentralized_fp32"] = ref
        out["bytes_reduction"] = ref["bytes_on_wire"] / out["decentralized"]["bytes_on_wire"]
        out["compressed_accuracy_drop_points"] = 100 * (ref["global_accuracy_mean"] - out["decentralized"]["global_accuracy_mean"])
    if "loc" in parts:
        out["local_only"] = run_peers(cfg, args.peers, args.rounds, False, args.topology, args.compress)
    if "cen" in parts:
        out["centralized"] = run_central(cfg, args.peers, args.rounds, large_batch=False)
    if "cenlb" in parts:
        out["centralized_large_batch"] = run_central(cfg, args.peers, args.rounds, large_batch=True)
    if "decentralized" in out:
        dec = out["decentralized"]["global_accuracy_mean"]
        for key in ("centralized", "centralized_large_batch"):
            if key in out:
                out[f"gap_to_{key}_points"] = 100 * (out[key]["global_accuracy"] - dec)
        if "local_only" in out:
            out["gain_over_local_points"] = 100 * (dec - out["local_only"]["global_accuracy_mean"])
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
