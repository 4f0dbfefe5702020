"""Differential privacy: accuracy and membership inference at several budgets, FFA-LoRA vs train_a.

Every cell is one decentralized training run of the daemon's own rounds in the simulator
(`p2pfl.sim.simulation`) with the real trainers: a ring, the shapes task, Dirichlet label skew, the same data,
seeds, rounds and optimizer in every cell. A cell's budget epsilon (``inf``: no DP) is met by
DP-SGD (`p2pfl.learn.privacy`) with the noise calibrated to spend it over the run at the stated delta;
the adapter exchange is FFA-LoRA (B alone trains and travels) or ``train_a`` (A and B).

The attack is the loss-threshold membership inference of Yeom et al. (CSF 2018) run by a
neighbour on what it received: after the last round, peer t+1 holds its CHOCO replica of peer t's
model, which is peer t's adapter right after its last local steps. It scores each of peer t's
training samples (members) and held-out samples (non-members, the same label skew) by their loss
under that model, less the mean loss of the candidates of the same class (difficulty calibration,
Watson et al., ICLR 2022, with the class as the difficulty); the lower, the more likely a member.
Scores of all targets are pooled, and the cell reports the attack's AUC and its advantage, max
over thresholds of TPR - FPR (the threshold an attacker who knew the answer would pick: an upper
bound for this attack); the JSON line also has the uncalibrated loss attack.

Prints one JSON line and writes the markdown table of docs/privacy.md to `--table`.

Every cell runs SGD (lr 0.03: train_a without DP diverges at 0.1); the DP cells have their own
options on top (`--dp-set`, default lr 0.3): clipping each sample's gradient to dp_clip shrinks
SGD's step along with it, so a DP run needs a larger learning rate than the same run without DP
(docs/privacy.md has the runs behind the choice).

usage: python bench/privacy.py [--peers 8] [--topology ring] [--rounds 8] [--seed 0]
                               [--epsilons inf,8,3,1] [--arms ffa,train_a] [--set KEY=VALUE ...]
                               [--dp-set KEY=VALUE ...] [--table FILE]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import emit, network_options
from sklearn.metrics import roc_auc_score, roc_curve

from p2pfl.config import PeerConfig, parse_sets
from p2pfl.core import topology as T
from p2pfl.core.gossip import State
from p2pfl.learn.data import Split
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.sim.simulation import Simulation

ARMS = {"ffa": False, "train_a": True}  # arm -> train_a


@torch.no_grad()
def sample_losses(tr: Trainer, state: State, split: Split) -> np.ndarray:
    """Each sample's cross-entropy under the adapter `state` (what the attacker holds)."""
    tr.load_adapter_state(state)
    with tr.model.bound():
        tr.model.clip.eval()
        head = tr._head(split)
        logits = torch.cat([tr.model.logits(split.images[i : i + 256], head) for i in range(0, len(split), 256)])
    return F.cross_entropy(logits, split.labels.to(logits.device), reduction="none").cpu().numpy()


def attack_figures(member: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUC, and the advantage max over thresholds of TPR - FPR, of scores where higher says 'member'."""
    fpr, tpr, _ = roc_curve(member, score)
    return {"auc": float(roc_auc_score(member, score)), "advantage": float(np.max(tpr - fpr))}


def membership_inference(trainers: dict[int, Trainer], received: dict[int, State]) -> dict:
    """The loss-threshold attack on every target's received model, members and non-members pooled
    over the targets; the score is the sample's loss less the mean loss of the target's candidates
    (members and non-members alike: the attacker does not know which) of the same class, so that
    easy and hard classes, and the targets' different models, share one threshold. The raw loss
    is reported beside it."""
    raw, calibrated, member = [], [], []
    for t, state in received.items():
        splits = (trainers[t].data.train, trainers[t].data.test)
        losses = np.concatenate([sample_losses(trainers[t], state, split) for split in splits])
        labels = np.concatenate([split.labels.numpy() for split in splits])
        means = {c: losses[labels == c].mean() for c in np.unique(labels)}
        raw.append(-losses)  # a lower loss says 'member'
        calibrated.append(-(losses - np.array([means[c] for c in labels])))
        member.append(np.concatenate([np.ones(len(splits[0])), np.zeros(len(splits[1]))]))
    m, score = np.concatenate(member), np.concatenate(calibrated)
    rng = np.random.default_rng(0)  # chance: the same scores against shuffled membership
    chance = float(np.mean([attack_figures(rng.permutation(m), score)["advantage"] for _ in range(20)]))
    return {**attack_figures(m, score), "chance_advantage": chance, "raw_loss": attack_figures(m, np.concatenate(raw)),
            "members": int(m.sum()), "non_members": int(len(m) - m.sum())}


def run_cell(cfg: TrainerConfig, topo: T.Topology, rounds: int) -> dict:
    """One training run (DP when `cfg` sets a budget); accuracy, spent epsilon, the attack."""
    t0 = time.perf_counter()
    trainers = {p: Trainer(cfg, p, topo.n, rounds=rounds) for p in topo.ids}
    pc = PeerConfig(topology=Path(topo.name), id=topo.ids[0], rounds=rounds, seed=cfg.seed, sketch_dim=0)
    sim = Simulation(topo, pc, trainers)
    sim.run()
    last = {p: sim.records[p][-1] for p in topo.ids}
    acc = [last[p]["global_accuracy"] for p in topo.ids]
    # A neighbour of t holds t's replica: t's adapter as it left t after its last local steps.
    received = {t: sim.nodes[topo.neighbors(t)[0]].mixer.engine.replicas[t].xhat for t in topo.ids}
    out = {"mean": float(np.mean(acc)), "worst": float(np.min(acc)), "attack": membership_inference(trainers, received)}
    if cfg.dp_epsilon is not None:
        out.update(epsilon_spent_max=max(last[p]["dp_epsilon_spent"] for p in topo.ids),
                   noise_multiplier=trainers[topo.ids[0]].dp.plan.noise, delta=trainers[topo.ids[0]].dp.plan.delta)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def targets(cells: dict[str, dict[str, dict]], epsilons: list[float]) -> dict[str, bool | None]:
    """The issue's three targets, each None when its cells were not run."""
    keys = {e: f"{e:g}" for e in epsilons}
    out: dict[str, bool | None] = {}
    for arm, row in cells.items():
        base = row.get(keys.get(math.inf, ""))
        if base is not None and "8" in row:
            out[f"{arm}_accuracy_at_8_within_5_points"] = base["mean"] - row["8"]["mean"] <= 0.05
        if base is not None:
            small = [row[keys[e]]["attack"]["advantage"] for e in epsilons if e <= 3]
            half = base["attack"]["advantage"] / 2
            out[f"{arm}_advantage_at_eps_le_3_at_most_half"] = all(a <= half for a in small) if small else None
    if "ffa" in cells and "train_a" in cells:
        finite = [keys[e] for e in epsilons if not math.isinf(e)]
        out["ffa_at_least_train_a_at_every_finite_eps"] = all(cells["ffa"][k]["mean"] >= cells["train_a"][k]["mean"] for k in finite)
    return out


def table(cells: dict[str, dict[str, dict]], epsilons: list[float]) -> str:
    """Markdown: one row per budget, per arm 'accuracy mean (worst)' and the attack's AUC / advantage."""
    arms = list(cells)
    head = ["epsilon", "noise multiplier"] + [f"{a}: accuracy mean (worst)" for a in arms] + [f"{a}: attack AUC / advantage (chance)" for a in arms]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for e in epsilons:
        k = f"{e:g}"
        sigma = cells[arms[0]][k].get("noise_multiplier")
        row = [k if not math.isinf(e) else "inf (no DP)", "-" if sigma is None else f"{sigma:.3f}"]
        row += [f"{cells[a][k]['mean']:.3f} ({cells[a][k]['worst']:.3f})" for a in arms]
        row += [f"{cells[a][k]['attack']['auc']:.3f} / {cells[a][k]['attack']['advantage']:.3f} ({cells[a][k]['attack']['chance_advantage']:.3f})"
                for a in arms]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    network_options(ap, rounds=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epsilons", default="inf,8,3,1")
    ap.add_argument("--arms", default="ffa,train_a")
    ap.add_argument("--dp-set", action="append", default=["lr=0.3"], metavar="KEY=VALUE",
                    help="trainer option of the DP cells (default lr=0.3: clipping shrinks the step)")
    ap.add_argument("--table", type=Path, default=Path("runs/bench-privacy.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    sets, dp_sets = parse_sets(args.set), parse_sets(args.dp_set)
    base = {"partition": "dirichlet:0.5", "samples_per_peer": 1024, "local_steps": 5, "batch_size": 64, "optimizer": "sgd", "lr": 0.03,
            "dp_delta": 1e-3, **sets, "seed": args.seed, "eval_every": args.rounds}
    topo = T.generate(args.topology, args.peers)
    t0 = time.time()
    cells: dict[str, dict[str, dict]] = {}
    for arm in args.arms.split(","):
        plain = TrainerConfig.from_dict({**base, "train_a": ARMS[arm]})
        private = TrainerConfig.from_dict({**base, **dp_sets, "train_a": ARMS[arm]})
        cells[arm] = {f"{e:g}": run_cell(plain if math.isinf(e) else replace(private, dp_epsilon=e), topo, args.rounds)
                      for e in epsilons}
    md = table(cells, epsilons)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(md)
    emit({"bench": "privacy", "peers": args.peers, "topology": args.topology, "rounds": args.rounds, "seed": args.seed,
          "trainer": TrainerConfig.from_dict(base).to_dict(), "dp_trainer": dp_sets, "cells": cells, "targets": targets(cells, epsilons),
          "table": str(args.table), "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
