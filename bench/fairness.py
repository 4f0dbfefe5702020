"""Fairness under label skew: decentralized training with vs without zero-shot augmentation.

Same foundation model, adapter, data partition (Dirichlet alpha = 0.05 by default), ring, the
daemon's own rounds in the simulator (p2pfl.sim.simulation: teachers are the live, synced neighbours'
replicas, as in the daemon) and the same budget (rounds x local steps x batch of real samples) in
both arms; the augmented arm additionally synthesises samples of each peer's under-represented
classes every round (p2pfl/learn/augment.py) and mixes them into its batches. Reported per arm, on the
shared global test set after the last round: mean accuracy over peers, std across peers, worst
peer and the worst-peer gap (mean - worst), and "unseen at peer" accuracy (each peer's accuracy
on the classes it never saw locally, averaged over peers), plus synthesis cost. Prints one JSON line.

Defaults: 5 rounds of 30 local steps (about 5 local epochs per round, the drift-heavy regime of
federated learning under label skew, where a peer's lack of classes hurts most).

usage: python bench/fairness.py [--peers 8] [--rounds 5] [--model shapes-clip] [--set key=value ...]
                               [--with-set key=value ...] [--arms without,with] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from common import emit, network_options, trainer_config

from p2pfl.config import parse_sets
from p2pfl.core import topology as T
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.ops.report import fairness_figures
from p2pfl.sim.simulation import train_network


def run_arm(cfg: TrainerConfig, n: int, rounds: int, kind: str) -> dict:
    """n trainers on a ``kind`` graph, one CHOCO round after each round of local steps."""
    t0 = time.perf_counter()
    trainers = {p: Trainer(replace(cfg, eval_every=rounds), p, n) for p in range(n)}
    sim = train_network(T.generate(kind, n), trainers, rounds, teachers=cfg.augment != "off", sketch_dim=0)
    train_recs = [r for recs in sim.records.values() for r in recs]
    synth_n = sum(int(r.get("synthetic_samples", 0)) for r in train_recs)
    synth_s = sum(r.get("synth_seconds_per_sample", 0.0) * r.get("synthetic_samples", 0) for r in train_recs)
    evals = [sim.records[p][-1] for p in range(n)]
    acc = [e["global_accuracy"] for e in evals]
    unseen = [e.get("unseen_accuracy") for e in evals]
    fair = fairness_figures(acc, unseen)
    return {
        **fair,
        "per_peer_accuracy": [round(a, 4) for a in acc],
        "per_peer_unseen_accuracy": [None if u is None or not np.isfinite(u) else round(u, 4) for u in unseen],
        "unseen_classes_per_peer": [len(t.unseen_classes) for t in trainers.values()],
        "synthetic_samples_total": synth_n,
        "synth_seconds_per_sample": synth_s / synth_n if synth_n else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


DELTA_KEYS = ("mean", "std", "worst", "worst_gap", "unseen_mean")


def compare(cfg: TrainerConfig, aug_cfg: TrainerConfig, arms: set[str], n: int, rounds: int, kind: str) -> dict:
    """Zero-shot figures and the chosen arms for one seed, with the differences in points."""
    zero = [Trainer(cfg, p, n) for p in range(n)]
    zero_eval = [t.evaluate(global_eval=True) for t in zero]
    del zero
    base = run_arm(cfg, n, rounds, kind) if "without" in arms else {}
    aug = run_arm(aug_cfg, n, rounds, kind) if "with" in arms else {}
    return {
        "seed": cfg.seed,
        "zero_shot": fairness_figures([e["global_accuracy"] for e in zero_eval], [e["unseen_accuracy"] for e in zero_eval]),
        "without_augment": base, "with_augment": aug,
        "delta_points": {k: 100 * (aug[k] - base[k]) for k in DELTA_KEYS if k in aug and k in base},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    network_options(ap, rounds=5)
    ap.add_argument("--model", default="shapes-clip", help="shapes-clip (ViT: feature space) or shapes-clip-rn (BN: image space)")
    ap.add_argument("--with-set", action="append", default=[], metavar="KEY=VALUE",
                    help="settings of the augmented arm only, e.g. logit_adjust=0 (augmentation without the adjustment it turns on)")
    ap.add_argument("--arms", default="without,with", help="which arms to run: without,with (both), without, or with")
    ap.add_argument("--seeds", default="", help="comma-separated run seeds (overrides seed=); adds the mean of the per-seed differences")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = replace(trainer_config(args.set, partition="dirichlet:0.05", local_steps=30, model=args.model), augment="off")
    with_sets = parse_sets(args.with_set)
    aug_cfg = TrainerConfig.from_dict({**cfg.to_dict(), **with_sets, "augment": "zero-shot"})
    arms = set(args.arms.split(","))
    if not arms or arms - {"without", "with"}:
        raise SystemExit(f"--arms: {args.arms!r} is not a subset of without,with")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [cfg.seed]
    t0 = time.time()
    runs = [compare(replace(cfg, seed=s), replace(aug_cfg, seed=s), arms, args.peers, args.rounds, args.topology) for s in seeds]
    out = {"bench": "fairness", "peers": args.peers, "rounds": args.rounds, "topology": args.topology,
           "trainer": cfg.to_dict(), "with_set": with_sets}
    if len(runs) == 1:
        out.update(runs[0])
    else:
        out["runs"] = runs
        out["mean_delta_points"] = {k: float(np.mean([r["delta_points"][k] for r in runs])) for k in runs[0]["delta_points"]}
    out["seconds"] = round(time.time() - t0, 1)
    emit(out)


if __name__ == "__main__":
    main()
