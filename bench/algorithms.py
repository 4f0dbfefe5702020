"""Decentralized baselines on one setting: static and time-varying graphs, D-SGD and gradient tracking.

Every arm is the daemon's own rounds in the simulator (`p2pfl.sim.simulation`), uncompressed, sketches off,
with the same trainer settings and the same samples per peer (rounds x local_steps x batch_size):
- D-SGD on the static ring and exponential graphs and on the one-peer exponential, random-regular:D
  and epidemic:S schedules (`p2pfl.core.schedule`);
- gradient tracking (K-GT, `algorithm=gt`) on the D-SGD arm with the best final accuracy;
- centralized training on the pooled data, batch n x B, the same steps: what averaging after every
  step gives (`bench/learning.py`'s large-batch baseline).
Per arm: mean global-test accuracy over the peers on the rounds that evaluate it (every 5th and
the last), mean local-test accuracy every round, bytes per peer per round on the wire, wall time.
Prints one JSON line; `--table` adds markdown tables (docs/algorithms.md).
usage: python bench/algorithms.py [--peers 96] [--rounds 10] [--degree 7] [--arms ring,exponential,...]
                                  [--gt-on best|ARM|none] [--no-central] [--set key=value ...] [--table]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import emit, run_central, trainer_config

from p2pfl.config import TrainerConfig
from p2pfl.core import topology as T
from p2pfl.learn.trainer import Trainer
from p2pfl.sim.simulation import train_network

ARMS = ("ring", "exponential", "one-peer-exponential", "random-regular", "epidemic")
DEFAULTS = {"partition": "dirichlet:0.1", "optimizer": "sgd", "lr": 0.1, "local_steps": 5, "global_test_size": 300}


def arm_topology(arm: str, n: int, degree: int) -> T.Topology:
    if arm in ("ring", "exponential"):
        return T.generate(arm, n)
    return T.scheduled(arm if arm == "one-peer-exponential" else f"{arm}:{degree}", n)


def run_arm(cfg: TrainerConfig, topo: T.Topology, rounds: int, algorithm: str) -> dict:
    t0 = time.time()
    trainers = {p: Trainer(cfg, p, topo.n) for p in topo.ids}
    sim = train_network(topo, trainers, rounds, algorithm=algorithm, sketch_dim=0)
    by_round: dict[int, list[dict]] = {}
    for recs in sim.records.values():
        for r in recs:
            by_round.setdefault(r["round"], []).append(r)
    local = {t: float(np.mean([r["accuracy"] for r in by_round[t]])) for t in range(rounds) if "accuracy" in by_round[t][0]}
    glob = {t: [r["global_accuracy"] for r in by_round[t] if "global_accuracy" in r] for t in range(rounds)}
    final = glob[rounds - 1]
    return {"algorithm": algorithm, "topology": topo.name, "global_accuracy_mean": float(np.mean(final)),
            "global_accuracy_min": float(np.min(final)), "global_accuracy_by_round": {t: float(np.mean(v)) for t, v in glob.items() if v},
            "local_accuracy_by_round": local, "bytes_per_peer_per_round": sum(sim.bytes_sent.values()) / (topo.n * rounds),
            "seconds": round(time.time() - t0, 1)}


def table(out: dict) -> str:
    cen = out["centralized"]["global_accuracy"]
    rows = ["| arm | global accuracy (mean / worst peer) | gap to centralized | bytes per peer per round | wall time |",
            "|---|---|---|---|---|"]
    for name, a in out["arms"].items():
        rows.append(f"| {name} | {a['global_accuracy_mean']:.3f} / {a['global_accuracy_min']:.3f} | "
                    f"{100 * (cen - a['global_accuracy_mean']):.1f} points | {a['bytes_per_peer_per_round'] / 1e3:,.0f} KB | {a['seconds']:,.0f} s |")
    rows.append(f"| centralized, batch n x B | {cen:.3f} | | | {out['centralized']['seconds']:,.0f} s |")
    rounds = sorted({int(t) for a in out["arms"].values() for t in a["global_accuracy_by_round"]})
    rows += ["", "| arm | " + " | ".join(f"round {t}" for t in rounds) + " |", "|---|" + "---|" * len(rounds)]
    for name, a in out["arms"].items():
        rows.append(f"| {name} | " + " | ".join(f"{a['global_accuracy_by_round'][t]:.3f}" for t in rounds) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--degree", type=int, default=7, help="D of random-regular and S of epidemic (EL: ceil(log2 n))")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--gt-on", default="best", help="the arm gradient tracking runs on: best (the best D-SGD arm), an arm, or none")
    ap.add_argument("--no-central", action="store_true", help="skip the centralized baseline")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = trainer_config(args.set, **DEFAULTS)
    t0 = time.time()
    out: dict = {"bench": "algorithms", "peers": args.peers, "rounds": args.rounds, "degree": args.degree, "trainer": cfg.to_dict(),
                 "zero_shot_global_accuracy": Trainer(cfg, 0, args.peers).evaluate(global_eval=True)["global_accuracy"], "arms": {}}
    for arm in args.arms.split(","):
        out["arms"][f"{arm}, D-SGD"] = run_arm(cfg, arm_topology(arm, args.peers, args.degree), args.rounds, "dsgd")
    best = max(out["arms"], key=lambda k: out["arms"][k]["global_accuracy_mean"])
    arm = best.split(",")[0] if args.gt_on == "best" else args.gt_on
    if arm != "none":
        out["gt_on"] = arm
        out["arms"][f"{arm}, gradient tracking"] = run_arm(cfg, arm_topology(arm, args.peers, args.degree), args.rounds, "gt")
    targets: dict = {}
    if not args.no_central:
        out["centralized"] = run_central(cfg, args.peers, args.rounds, large_batch=True)
        cen = out["centralized"]["global_accuracy"]
        targets["best_dsgd_gap_to_centralized_points"] = 100 * (cen - out["arms"][best]["global_accuracy_mean"])
        if arm != "none":
            targets["gt_gap_to_centralized_points"] = 100 * (cen - out["arms"][f"{arm}, gradient tracking"]["global_accuracy_mean"])
    acc = {k: v["global_accuracy_mean"] for k, v in out["arms"].items()}
    if "one-peer-exponential, D-SGD" in acc and "exponential, D-SGD" in acc:
        one, exp = out["arms"]["one-peer-exponential, D-SGD"], out["arms"]["exponential, D-SGD"]
        targets["one_peer_minus_exponential_points"] = 100 * (one["global_accuracy_mean"] - exp["global_accuracy_mean"])
        targets["one_peer_bytes_fraction_of_exponential"] = one["bytes_per_peer_per_round"] / exp["bytes_per_peer_per_round"]
    out["targets"] = targets
    out["seconds"] = round(time.time() - t0, 1)
    emit(out)
    if args.table and "centralized" in out:
        print(table(out))


if __name__ == "__main__":
    main()
