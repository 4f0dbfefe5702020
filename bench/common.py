"""What the benches share: their JSON line, trainer settings from `--set KEY=VALUE`, the
decentralized-vs-alone-vs-pooled training runs, and a process's PSS.

`python bench/x.py` puts bench/ first on sys.path, so a bench imports this module as `common`.
The learning stack (open_clip) is imported where a run needs it, so transport benches do not load it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.config import TrainerConfig, parse_sets
from p2pfl.core import topology as T
from p2pfl.sim.simulation import train_network


def emit(out: dict[str, Any]) -> None:
    """A bench's result: one JSON line on stdout."""
    print(json.dumps(out), flush=True)


def network_options(ap: argparse.ArgumentParser, rounds: int) -> None:
    """The options of a bench that trains peers on a generated graph: --peers, --topology (a
    generator kind), --rounds and the trainer's --set KEY=VALUE (repeatable)."""
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--topology", default="ring", help="generator kind (p2pfl-topology generate)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option (repeatable)")


def trainer_config(sets: list[str], **base: Any) -> TrainerConfig:
    """The bench's trainer settings `base` with `--set KEY=VALUE` options over them (typed as
    p2pfl-peer types them)."""
    return TrainerConfig.from_dict({**base, **parse_sets(sets)})


def run_peers(cfg: TrainerConfig, n: int, rounds: int, mix: bool, kind: str, compress: str) -> dict:
    """n peers of `kind`, `rounds` rounds; with `mix` the daemon's rounds in the simulator, else
    local steps only. Accuracies on the shared global test set after the last round."""
    from p2pfl.learn.trainer import Trainer

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
    """One trainer on the union of n peers' data: n times the batch (`large_batch`) or n times the
    local steps of a peer per round."""
    from p2pfl.learn.trainer import Trainer

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


def pss_kib(pid: int | str = "self", field: str = "Pss") -> int:
    """A process's proportional set size (shared pages count by their share) in KiB, or one of its
    parts (`Pss_Anon`: heap and other private memory, which does not move when other processes map
    or unmap the same library files, as `Pss_File` does); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
