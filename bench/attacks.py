"""Byzantine attacks vs robust mixing: the honest peers' accuracy after decentralized training.

One peer (`--bad`) of a ring (or another graph) runs an attack of the `--byzantine` harness
(`p2pfl/core/robust.py`): model poisoning through its gossip (scale, noise, signflip, alie, ipm) or data
poisoning (labelflip: it trains on flipped labels and gossips honestly); every peer mixes with one
option of `--robust` (off, clip, trimmed:1, median). The daemon's own rounds run in the simulator
(`p2pfl.sim.simulation`) with the real trainers, the same seeds, data and budget in every cell; each cell
starts from fresh trainers. Reported per cell: the honest peers' mean and worst accuracy on the
shared global test set after the last round, and the messages they rejected. Prints one JSON line
and writes the markdown table of docs/attacks.md to `--table`.

Defaults size the whole grid (7 attacks x 4 defences, ring of 8, 8 rounds of 5 local steps) for
the shared 2-core dev machine.

usage: python bench/attacks.py [--peers 8] [--topology ring] [--rounds 8] [--bad 0] [--seed 0]
                               [--attacks none,scale:3,...] [--defences off,clip,trimmed:1,median]
                               [--set KEY=VALUE ...] [--table FILE]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import emit, network_options, trainer_config

from p2pfl.config import PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.robust import ByzantineSpec, flips_labels
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.sim.simulation import Simulation

ATTACKS = ("none", "scale:3", "noise:0.1", "labelflip", "signflip", "alie", "ipm", "abuse:400")
DEFENCES = ("off", "clip", "trimmed:1", "median")


def run_cell(cfg: TrainerConfig, topo: T.Topology, rounds: int, bad: int, attack: str, defence: str) -> dict:
    """One training run: `bad` attacks with `attack`, every peer mixes with `defence`."""
    t0 = time.perf_counter()
    spec = "off" if attack == "none" else attack
    trainers = {p: Trainer(cfg, p, topo.n, label_flip=p == bad and flips_labels(spec)) for p in topo.ids}
    # The protocol flood runs on the clock: rounds of half a (virtual) second give it 200 messages a
    # round to each neighbour at abuse:400 (the simulator's rounds otherwise take no time).
    paced = {"round_period": 0.5} if ByzantineSpec.parse(spec).name == "abuse" else {}
    pc = PeerConfig(topology=Path(topo.name), id=topo.ids[0], rounds=rounds, seed=cfg.seed, robust=defence, sketch_dim=0, **paced)
    sim = Simulation(topo, pc, trainers, per_peer={bad: {"byzantine": spec}})
    sim.run()
    honest = [p for p in topo.ids if p != bad]
    acc = [sim.records[p][-1]["global_accuracy"] for p in honest]
    return {"mean": float(np.mean(acc)), "worst": float(np.min(acc)),
            "rejected": sum(int(sim.records[p][-1].get("rejected_messages", 0)) for p in honest),
            "seconds": round(time.perf_counter() - t0, 1)}


def table(cells: dict[str, dict[str, dict]], attacks: list[str], defences: list[str]) -> str:
    """Markdown: one row per attack, one column per defence, 'mean (worst)' honest accuracy."""
    lines = ["| attack | " + " | ".join(f"`{d}`" for d in defences) + " |", "|---" * (len(defences) + 1) + "|"]
    for a in attacks:
        row = [f"{cells[d][a]['mean']:.3f} ({cells[d][a]['worst']:.3f})" for d in defences]
        lines.append(f"| `{a}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    network_options(ap, rounds=8)
    ap.add_argument("--bad", type=int, default=0, help="the Byzantine peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="'none' or --byzantine specs, comma-separated")
    ap.add_argument("--defences", default=",".join(DEFENCES), help="--robust specs, comma-separated")
    ap.add_argument("--table", type=Path, default=Path("runs/bench-attacks.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    attacks, defences = args.attacks.split(","), args.defences.split(",")
    for a in attacks:
        if a != "none":
            ByzantineSpec.parse(a)  # a typo fails before any training
    cfg = replace(trainer_config(args.set, partition="dirichlet:0.5", local_steps=5), seed=args.seed, eval_every=args.rounds)
    topo = T.generate(args.topology, args.peers)
    t0 = time.time()
    zero = Trainer(cfg, (args.bad + 1) % args.peers, args.peers).evaluate(global_eval=True)["global_accuracy"]
    cells: dict[str, dict[str, dict]] = {d: {} for d in defences}
    for d in defences:
        for a in attacks:
            cells[d][a] = run_cell(cfg, topo, args.rounds, args.bad, a, d)
    md = table(cells, attacks, defences)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(md)
    emit({"bench": "attacks", "peers": args.peers, "topology": args.topology, "rounds": args.rounds,
          "bad": args.bad, "seed": args.seed, "trainer": cfg.to_dict(), "zero_shot_accuracy": zero,
          "honest_accuracy": cells, "table": str(args.table), "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
