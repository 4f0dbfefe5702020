"""Bytes on the wire to reach consensus with CHOCO-Gossip, per codec, relative to exact fp32 gossip.

Sans-IO ring of 16 real `ChocoEngine`s (`p2pfl.sim.engines`), each codec at its `default_gamma`.
Every DELTA is wire-encoded (msgpack header + raw part frames, `p2pfl.core.wire`) and decoded by
each receiver; bytes = frame bytes x recipients. A run stops when the exact consensus distance
Xi = sqrt(1/n sum_i ||x_i - xbar||^2) falls to `target` x its start (default 1e-4), or gives up
after `max_factor` x the rounds exact gossip needed (then `reached` is false and the ratio is a
lower bound). Also times encode and decode of a 1M-float tensor per codec (best of `reps`), with
one thread (`encode_ms`, `decode_ms`) and with torch's default thread count (`encode_ms_<N>t`).
With ``--train CODECS`` it also trains: ring-8 decentralized learning on the shapes task
(bench/learning.py's setting, ``--train-rounds`` rounds, trainer ``--set KEY=VALUE``) once
uncompressed and once per codec, and reports each codec's byte reduction on the wire and its
final accuracy relative to the uncompressed run. Prints one JSON line.

usage: python bench/compression.py [--dim 32768] [--target 1e-4] [--codecs none,fp16,...]
                                   [--train sign:2048,int8 --train-rounds 20 --set local_steps=5]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import emit, run_peers, trainer_config

from p2pfl.core import topology as T
from p2pfl.core.codec import encoded_nbytes
from p2pfl.core.compress import get_codec
from p2pfl.core.consensus import exact_distance
from p2pfl.sim.engines import EngineNetwork

CODECS = [
    "fp16",
    "bf16",
    "int8",
    "sign:tensor",
    "sign:64",
    "sign:128",
    "topk:0.1",
    "topk:0.05+int8",
    "topk:0.1+sign:64",
    "randk:0.2+int8",
    "randk:0.2+sign:64",
]


def starts(n: int, dim: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """A shared base plus independent per-peer parts, like adapters fine-tuned from one init."""
    g = torch.Generator().manual_seed(seed)
    common = 0.25 * torch.randn(dim, generator=g)
    return {p: {"w": common + torch.randn(dim, generator=g)} for p in range(n)}


def run(spec: str, topo: T.Topology, x0: dict, target: float, max_rounds: int) -> dict:
    net = EngineNetwork(topo, x0, spec, seed=1)
    d0 = exact_distance(x0.values())
    dist, t0 = d0, time.perf_counter()
    while dist > target * d0 and net.round + 1 < max_rounds and math.isfinite(dist):
        net.step()
        if net.replies:
            raise RuntimeError(f"{spec}: unexpected resync traffic in round {net.round}")
        dist = exact_distance(net.states().values())
    return {
        "gamma": net.engines[0].gamma,
        "rounds": net.round + 1,
        "reached": dist <= target * d0,
        "final_reduction": dist / d0,
        "bytes": net.bytes_sent,
        "sim_s": round(time.perf_counter() - t0, 2),
    }


def timing(spec: str, numel: int, reps: int) -> dict:
    codec = get_codec(spec)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    enc = codec.encode(x, seed=7)

    def best(f) -> float:
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return round(min(ts) * 1e3, 3)

    return {
        "encode_ms": best(lambda: codec.encode(x, seed=7)),
        "decode_ms": best(lambda: codec.decode(enc, (numel,))),
        "payload_ratio": round(encoded_nbytes(enc) / (4 * numel), 5),
    }


def train(specs: list[str], rounds: int, sets: list[str], peers: int = 8) -> dict:
    """Accuracy vs bytes of real decentralized training per codec, relative to uncompressed."""
    cfg = trainer_config(sets, partition="dirichlet:0.5")
    ref = run_peers(cfg, peers, rounds, True, "ring", "none")
    runs = {}
    for spec in specs:
        r = run_peers(cfg, peers, rounds, True, "ring", spec)
        runs[spec] = {
            **r,
            "bytes_reduction": round(ref["bytes_on_wire"] / r["bytes_on_wire"], 2),
            "accuracy_drop_points": round(100 * (ref["global_accuracy_mean"] - r["global_accuracy_mean"]), 2),
        }
    return {
        "setting": f"ring-{peers}, {rounds} rounds, {cfg.partition}, local_steps {cfg.local_steps}",
        "uncompressed": ref,
        "codecs": runs,
        "at_least_30x_within_1_point": sorted(
            s for s, r in runs.items() if r["bytes_reduction"] >= 30 and r["accuracy_drop_points"] <= 1
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=32768)
    ap.add_argument("--target", type=float, default=1e-4)
    ap.add_argument("--max-factor", type=float, default=8.0)
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--timing-numel", type=int, default=1 << 20)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--train", default="", help="codecs to train with (comma-separated); empty: no training")
    ap.add_argument("--train-rounds", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer setting for --train")
    args = ap.parse_args()

    threads = torch.get_num_threads()
    specs = ["none", *args.codecs.split(",")]
    times_mt = {spec: timing(spec, args.timing_numel, args.reps) for spec in specs}
    torch.set_num_threads(1)  # also: 16 engines in one process, where intra-op threads only contend
    times = {spec: timing(spec, args.timing_numel, args.reps) for spec in specs}
    for spec in specs:
        times[spec].update({f"{k}_{threads}t": v for k, v in times_mt[spec].items() if k.endswith("_ms")})

    topo = T.generate("ring", args.peers)
    x0 = starts(args.peers, args.dim)
    exact = run("none", topo, x0, args.target, 10 * topo.rounds_to(args.target))
    out: dict[str, dict] = {}
    for spec in args.codecs.split(","):
        r = run(spec, topo, x0, args.target, int(args.max_factor * exact["rounds"]))
        out[spec] = {**r, "bytes_ratio": round(r["bytes"] / exact["bytes"], 5), **times[spec]}
    reached = {s: r["bytes_ratio"] for s, r in out.items() if r["reached"]}
    best = min(reached, key=reached.get) if reached else None
    training = train(args.train.split(","), args.train_rounds, args.set) if args.train else {}
    emit({
        "bench": "compression",
        "topology": f"ring-{args.peers}",
        "dim": args.dim,
        "target_reduction": args.target,
        "exact": {**exact, "theory_rounds": topo.rounds_to(args.target), **times["none"]},
        "codecs": out,
        "best": {"codec": best, "bytes_ratio": reached.get(best)},
        "within_5pct": sorted(s for s, v in reached.items() if v <= 0.05),
        "timing_numel": args.timing_numel,
        "training": training,
    })

if __name__ == "__main__":
    main()
