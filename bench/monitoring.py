"""What the consensus estimate costs and how far it is off (docs/wan.md, "Monitoring bytes").

- bytes: a `--no-train` run in the simulator at make run's adapter size (`--dim 32768`,
  `sign:2048`), every frame encoded as the wire carries it, split into delta payload, estimate
  blocks, delta headers (and block descriptors), the drain rounds' deltas and each control kind,
  each over the delta payload; the rounds that got an estimate. The simulator's rounds take
  milliseconds, so it sends few heartbeats: `make run` measures those.
- `--adapters RUN_DIR ...`: the sketch's own error on a finished run's saved adapters, per row
  count, over `--seeds` sketch seeds: rms and largest |estimate / exact - 1|.

usage: .venv/bin/python bench/monitoring.py [--topology ring] [--peers 8] [--rounds 40] [--set KEY=VALUE]
       .venv/bin/python bench/monitoring.py --adapters RUN_DIR [RUN_DIR ...] [--seeds 40]
Prints one JSON line (ring-8: seconds; ring-64: about a minute).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from common import emit

from p2pfl.config import PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.consensus import exact_distance, shared_sketcher, sketch_distance
from p2pfl.core.wire import Kind, encode, frames_nbytes
from p2pfl.host.checkpoint import load_state
from p2pfl.node.piggyback import ESTIMATE_TENSOR, FINGERPRINT_TENSOR, SKETCH_TENSOR
from p2pfl.sim.simulation import Simulation

BLOCKS = (SKETCH_TENSOR, ESTIMATE_TENSOR, FINGERPRINT_TENSOR)
ROWS = (64, 128, 256, 512, 1024)


def bytes_by_part(kind: str, n: int, rounds: int, settings: dict[str, Any]) -> dict[str, Any]:
    topo = T.generate(kind, n)
    cfg = PeerConfig(topology=Path(topo.name), id=0, rounds=rounds, **{"compress": "sign:2048", "dim": 32768, **settings})
    sim = Simulation(topo, cfg)
    parts: dict[str, int] = {}
    send = sim._send

    def counted(src: int, a: Any) -> None:
        m = a.msg
        wire = frames_nbytes(encode(m))
        if m.kind == Kind.DELTA:
            blocks = sum(tp.nbytes() for name, tp in m.tensors.items() if name in BLOCKS)
            payload = sum(tp.nbytes() for tp in m.tensors.values()) - blocks
            key = "drain_deltas" if m.round >= rounds else "headers"
            parts["payload"] = parts.get("payload", 0) + payload
            parts["blocks"] = parts.get("blocks", 0) + blocks
            parts[key] = parts.get(key, 0) + wire - payload - blocks
        else:
            parts[str(m.kind)] = parts.get(str(m.kind), 0) + wire
        send(src, a)

    sim._send = counted  # type: ignore[method-assign]
    sim.run()
    payload = parts.pop("payload")
    estimated = sorted({r["round"] for recs in sim.records.values() for r in recs
                        if r.get("consensus_distance") is not None and math.isfinite(r["consensus_distance"])})
    last = sim.records[topo.ids[0]][-1].get("consensus_distance")
    return {"topology": topo.name, "rounds": rounds, "settings": settings, "delta_payload_bytes": payload,
            "not_delta_share": sum(parts.values()) / payload, "share_by_part": {k: v / payload for k, v in sorted(parts.items())},
            "estimated_rounds": estimated, "last_estimate_error": None if last is None else last / exact_distance(sim.models().values()) - 1}


def sketch_error(run_dirs: list[str], seeds: int) -> dict[str, Any]:
    out = {}
    for d in run_dirs:
        states = sorted(Path(d).glob("peer-*/adapter.safetensors"))
        x = torch.stack([torch.cat([v.reshape(-1).double() for _, v in sorted(load_state(p).items())]) for p in states])
        xi = float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt())
        per_k = {}
        for k in ROWS:
            errs = [sketch_distance([sk(v) for v in x]) / xi - 1 for sk in (shared_sketcher(x.shape[1], k, s) for s in range(seeds))]
            per_k[k] = {"rms": math.sqrt(sum(e * e for e in errs) / len(errs)), "max_abs": max(map(abs, errs)), "seed0": errs[0]}
        out[d] = {"peers": len(states), "exact": xi, "rows": per_k}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--estimator", default="auto")
    ap.add_argument("--monitor-share", type=float, default=0.25)
    ap.add_argument("--adapters", nargs="+", metavar="RUN_DIR", help="the sketch's error on these runs' saved adapters")
    ap.add_argument("--seeds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.adapters:
        emit({"bench": "monitoring", "sketch_error": sketch_error(args.adapters, args.seeds), "seeds": args.seeds})
        return
    settings = {"estimator": args.estimator, "monitor_share": args.monitor_share}
    emit({"bench": "monitoring", **bytes_by_part(args.topology, args.peers, args.rounds, settings)})


if __name__ == "__main__":
    main()
