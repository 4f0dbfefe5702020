"""End-to-end check of co-hosted peers on one GPU: `python scripts/gpu_check.py [--peers 8] [--rounds 5]`.

Runs every peer of a generated ring in one process with `device=cuda`, then the same on the CPU,
and prints one JSON line: exit codes, seconds, final accuracies on both devices and their largest
difference (GPU kernels differ from CPU ones in the last bits, so they match to a tolerance, not
exactly), and whether the adapters on disk are finite CPU tensors. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from p2pfl.core import topology as T
    from p2pfl.host.checkpoint import load_state
    from p2pfl.host.files import dump_topology, read_jsonl

    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import torch

    out: dict = {"check": "gpu", "cuda": torch.cuda.is_available(), "peers": args.peers, "rounds": args.rounds}
    if not out["cuda"]:
        print(json.dumps({**out, "ok": False, "why": "no CUDA device here"}))
        return 1
    out["device_name"] = torch.cuda.get_device_name(0)
    tmp = Path(tempfile.mkdtemp(prefix="p2pfl-gpu-"))
    path = tmp / "ring.yaml"
    dump_topology(T.generate("ring", args.peers, base_port=28600), path)
    final = {}
    for device in ("cuda", "cpu"):
        run = tmp / device
        t0 = time.time()
        code = subprocess.call([sys.executable, "-m", "p2pfl", "--topology", str(path), "--id", f"0-{args.peers - 1}",
                                "--run-dir", str(run), "--rounds", str(args.rounds), "--set", f"device={device}",
                                "--set", "eval_every=1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        recs = {p: read_jsonl(run / "metrics" / f"peer-{p}.jsonl") for p in range(args.peers)}
        final[device] = [recs[p][-1]["accuracy"] for p in range(args.peers)]
        adapters = [load_state(run / f"peer-{p}" / "adapter.safetensors") for p in range(args.peers)]
        out[device] = {"exit_code": code, "seconds": round(time.time() - t0, 1),
                       "mean_accuracy": sum(final[device]) / args.peers,
                       "rounds_done": min(len(r) for r in recs.values()),
                       "train_s_mean": sum(r[-1].get("train_s", 0.0) for r in recs.values()) / args.peers,
                       "adapters_finite_cpu": all(v.device.type == "cpu" and bool(torch.isfinite(v).all()) for a in adapters for v in a.values())}
    out["max_accuracy_difference"] = max(abs(a - b) for a, b in zip(final["cuda"], final["cpu"], strict=True))
    out["ok"] = (out["cuda"]["exit_code"] == 0 and out["cpu"]["exit_code"] == 0 and out["cuda"]["rounds_done"] == args.rounds
                 and out["cuda"]["adapters_finite_cpu"] and out["max_accuracy_difference"] <= 0.05)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
