"""Wide-area faults against loopback: exact gossip over real TCP through the fault-injecting proxy
(`p2pfl.net.proxy`), and training in the simulator over the same link model.

- ring-16 `--no-train`, exact gossip, one process per peer (every edge through the proxy):
  loopback, the WAN profile (one-way delay 25-75 ms per link, 5 ms jitter, 20 Mbit/s, a reset of
  some link every few seconds), and partition-and-heal (the halves 0-7 and 8-15 cut for 15 rounds
  at round 2, with `--after-heal` more rounds than the others so that at least that many follow
  the heal). Rounds, wall time, deadline misses, gaps asked for again, states applied, the network
  mean's drift and, after the heal, exact consensus against the spectral bound counted from the
  first round the cut links are both up and mixed with again.
- ring-8 training (make run's settings, fewer rounds) in the simulator, loopback against the WAN
  link model (delay, jitter and the rate cap per message); work takes no virtual time there, so
  the wall ratio comes from the TCP runs. Accuracy at the same rounds, deadline misses, and the
  bytes that are not deltas (consensus sketches, headers, controls) over the delta bytes.

usage: .venv/bin/python bench/wan.py [--rounds 30] [--after-heal 15] [--train-rounds 10] [--dim 4096] [--seed 0]
Prints one JSON line (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import emit, trainer_config

from p2pfl.core import topology as T
from p2pfl.core.consensus import exact_distance, network_mean
from p2pfl.core.state import synthetic_state
from p2pfl.core.wire import encode, frames_nbytes
from p2pfl.host.checkpoint import load_state
from p2pfl.host.files import dump_topology, read_jsonl
from p2pfl.net.ports import free_base_port
from p2pfl.net.proxy import Profile, Proxy, play, route

ROOT = Path(__file__).resolve().parent.parent
WAN = Profile(delay=(0.025, 0.075), jitter=0.005, rate=20e6 / 8, reset_every=20.0)


async def _records_reach(run: Path, peers: list[int], rnd: int) -> None:
    while not all((f := run / "metrics" / f"peer-{p}.jsonl").exists() and read_jsonl(f, last=1)
                  and read_jsonl(f, last=1)[0]["round"] >= rnd for p in peers):
        await asyncio.sleep(0.1)


async def _tcp_run(topo: T.Topology, run: Path, args: list[str], proxy: Proxy | None, profile: Profile | None,
                   cut_at: int | None, cut_rounds: int, seed: int) -> dict[str, Any]:
    path = run / "topology.yaml"
    run.mkdir(parents=True)
    dump_topology(topo, path)
    marks: dict[str, int] = {}
    player = None
    if proxy is not None:
        await proxy.start()
        if profile is not None:
            player = asyncio.create_task(play(proxy, profile, seed))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    procs = []
    for p in topo.ids:
        with open(run / f"stdout-{p}.log", "wb") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen([sys.executable, "-m", "p2pfl", "--topology", str(path), "--id", str(p), "--run-dir", str(run),
                                           *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    try:
        if proxy is not None and cut_at is not None:
            half = topo.n // 2
            await _records_reach(run, [half - 1, half], cut_at)
            proxy.cut([range(half), range(half, topo.n)])
            marks["cut"] = max(read_jsonl(run / "metrics" / f"peer-{p}.jsonl", last=1)[0]["round"] for p in (half - 1, half))
            await _records_reach(run, [half - 1, half], marks["cut"] + cut_rounds)
            proxy.heal()
            marks["heal"] = max(read_jsonl(run / "metrics" / f"peer-{p}.jsonl", last=1)[0]["round"] for p in (half - 1, half))
        while any(pr.poll() is None for pr in procs):
            await asyncio.sleep(0.1)
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
        if player is not None:
            player.cancel()
        if proxy is not None:
            await proxy.close()
    wall = time.monotonic() - t0
    recs = {p: read_jsonl(run / "metrics" / f"peer-{p}.jsonl") for p in topo.ids}
    out: dict[str, Any] = {"codes": sorted({pr.returncode for pr in procs}), "wall_s": round(wall, 1),
                           "rounds_completed": min(len(r) for r in recs.values()),
                           "deadline_miss_share": sum(len(r["late_neighbors"]) for rs in recs.values() for r in rs)
                           / max(1, sum(r["live_neighbors"] for rs in recs.values() for r in rs)),
                           "gaps_asked": sum(rs[-1].get("gaps_asked", 0) for rs in recs.values()),
                           "states_applied": sum(rs[-1].get("states_applied", 0) for rs in recs.values()),
                           "late_settled": sum(rs[-1].get("late_settled", 0) for rs in recs.values())}
    if proxy is not None:
        out["connections_reset"] = sum(link.resets for link in proxy.links.values())
    dim = int(args[args.index("--dim") + 1])
    x0 = {p: synthetic_state(0, p, dim) for p in topo.ids}
    xs = {p: load_state(run / f"peer-{p}" / "adapter.safetensors") for p in topo.ids}
    m0 = network_mean(x0.values())
    out["mean_drift_rel"] = float((network_mean(xs.values()) - m0).norm() / m0.norm())
    xi = exact_distance(xs.values())
    out["final_consensus_distance"] = xi
    if marks:  # the rounds each boundary peer spent alone, from its records (they trail the rounds)
        half = topo.n // 2
        alone = {p: [r["round"] for r in recs[p] if r["live_neighbors"] == 1] for p in (half - 1, half, topo.n - 1, 0)}
        healed = max(a[-1] for a in alone.values() if a) + 1
        back = max(min((r["round"] for r in recs[p] if r["round"] >= healed and r["live_neighbors"] == 2 and not r["late_neighbors"]),
                       default=10**9) for p in alone)
        xi_back = max(recs[p][back]["consensus_distance"] for p in topo.ids) if back < len(recs[0]) else float("nan")
        bound = topo.mixing_lambda() ** (len(recs[0]) - 1 - back) * xi_back
        out.update(rounds_alone={p: len(a) for p, a in alone.items()}, healed_round=healed, back_round=back,
                   rounds_after_back=len(recs[0]) - 1 - back,
                   xi_at_back_estimate=xi_back, spectral_bound=bound, heal_within_bound=bool(xi <= bound * 1.3))
    return out


def tcp_part(rounds: int, after_heal: int, dim: int, seed: int) -> dict[str, Any]:
    n = 16
    args = ["--no-train", "--dim", str(dim), "--min-wait", "0.2", "--round-timeout", "2",
            "--peer-timeout", "2", "--heartbeat", "0.3", "--sketch-dim", "256", "--monitor-share", "0", "--seed", "0"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="wan-") as tmp:
        for name in ("loopback", "wan", "partition"):
            topo = T.generate("ring", n, base_port=free_base_port(n))
            proxy = None
            if name != "loopback":
                topo, proxy = route(topo, free_base_port(4 * n))
            profile = WAN if name == "wan" else None
            # Paced, so that neither half runs --max-lag rounds ahead; rounds enough for `after_heal` after the heal.
            paced = ["--round-period", "0.2", "--rounds", str(rounds + after_heal)] if name == "partition" else ["--rounds", str(rounds)]
            out[name] = asyncio.run(_tcp_run(topo, Path(tmp) / name, args + paced, proxy, profile, 2 if name == "partition" else None,
                                             15, seed))
    return out


def sim_part(rounds: int, sets: list[str], seed: int) -> dict[str, Any]:
    from dataclasses import replace

    from p2pfl.config import PeerConfig
    from p2pfl.learn.trainer import Trainer
    from p2pfl.sim.simulation import Simulation

    n = 8
    topo = T.generate("ring", n)
    cfg = trainer_config(sets, dataset="shapes", task="shape", partition="dirichlet:0.5", local_steps=3, lr=0.002, eval_every=rounds)
    rng = random.Random(seed)
    delay = {(a, b): rng.uniform(*WAN.delay) for a in topo.ids for b in topo.neighbors(a) if a < b}

    def wan_latency(src: int, dst: int, msg) -> float:
        nbytes = frames_nbytes(encode(msg))
        return delay[min(src, dst), max(src, dst)] + rng.uniform(0.0, WAN.jitter) + nbytes / WAN.rate

    out = {}
    for name, latency in (("loopback", 1e-3), ("wan", wan_latency)):
        trainers = {p: Trainer(replace(cfg, seed=seed), p, n) for p in topo.ids}
        pc = PeerConfig(topology=Path("ring-8"), id=0, rounds=rounds, compress="sign:2048", seed=seed)
        t0 = time.time()
        sim = Simulation(topo, pc, trainers, latency=latency)
        sim.run()
        recs = [r for p in topo.ids for r in sim.records[p] if r["round"] < rounds]
        delta = sum(r["payload_bytes"] for r in recs) * 2  # each peer's delta goes to its two neighbours
        sent = sum(sim.bytes_sent.values())
        out[name] = {"accuracy": sum(sim.records[p][-1]["global_accuracy"] for p in topo.ids) / n,
                     "virtual_s": round(sim.now, 2), "seconds": round(time.time() - t0, 1),
                     "deadline_miss_share": sum(len(r["late_neighbors"]) for r in recs) / max(1, sum(r["live_neighbors"] for r in recs)),
                     "bytes_sent": sent, "delta_bytes": delta, "monitoring_bytes_share": (sent - delta) / delta}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30, help="ring-16 --no-train rounds (partition needs >= 35)")
    ap.add_argument("--after-heal", type=int, default=15, help="rounds the partition run adds, to follow the heal")
    ap.add_argument("--train-rounds", type=int, default=10)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tcp = tcp_part(max(args.rounds, 35), args.after_heal, args.dim, args.seed)
    sim = sim_part(args.train_rounds, args.set, args.seed)
    emit({"bench": "wan", "seed": args.seed, "profile": {"delay_s": WAN.delay, "jitter_s": WAN.jitter, "rate_Bps": WAN.rate,
                                                         "reset_every_s": WAN.reset_every},
          "accuracy_gap_points": 100 * (sim["loopback"]["accuracy"] - sim["wan"]["accuracy"]),
          "deadline_miss_share": tcp["wan"]["deadline_miss_share"],
          "deadline_miss_share_training_sim": sim["wan"]["deadline_miss_share"],
          "wall_ratio_wan_vs_loopback": tcp["wan"]["wall_s"] / tcp["loopback"]["wall_s"],
          "heal_within_bound": tcp["partition"].get("heal_within_bound"),
          "mean_drift_rel": tcp["wan"]["mean_drift_rel"],
          "monitoring_bytes_share": sim["loopback"]["monitoring_bytes_share"],
          "no_train_ring16_tcp": tcp, "training_ring8_sim": sim})


if __name__ == "__main__":
    main()
