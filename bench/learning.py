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
import time

import torch
from common import emit, network_options, run_central, run_peers, trainer_config

from p2pfl.learn.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    network_options(ap, rounds=30)
    ap.add_argument("--compress", default="none")
    ap.add_argument("--only", default="dec,loc,cen,cenlb")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = trainer_config(args.set, partition="dirichlet:0.5")
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
    emit(out)


if __name__ == "__main__":
    main()
