"""Soak: one process of co-hosted peers for many rounds; its memory, open files and threads sampled
against the rounds done, and their slope per 1000 rounds (least squares over the run's second
half, after start-up has allocated what it keeps).

usage: .venv/bin/python bench/soak.py [--peers 16] [--rounds 3000] [--train] [--every 1.0] [-- PEER ARGS]
  default: ring-16 --no-train --dim 2048 --sketch-dim 256; --train: ring-8 training (make run's
  settings, --rounds as asked). Prints one JSON line. Not run in CI (minutes to hours).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit, pss_kib

from p2pfl.core import topology as T
from p2pfl.host.files import dump_topology, read_jsonl
from p2pfl.net.ports import free_base_port

ROOT = Path(__file__).resolve().parent.parent


def sample(pid: int) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_kib": int(status["VmRSS"].split()[0]), "pss_kib": pss_kib(pid), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def slope_per_1000(rounds: list[int], values: list[int]) -> float:
    half = len(rounds) // 2
    r, v = np.array(rounds[half:], dtype=float), np.array(values[half:], dtype=float)
    if len(r) < 3 or np.ptp(r) == 0:
        return float("nan")
    return float(np.polyfit(r, v, 1)[0] * 1000)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    n = args.peers or (8 if args.train else 16)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        run = Path(tmp) / "run"
        if args.train:
            topo = T.generate("ring", n, base_port=free_base_port(n))  # make run's ring-8, on free ports
            topo.settings = T.parse((ROOT / "topologies" / "ring.yaml").read_text(), "ring.yaml").settings
            peer_args = ["--checkpoint-every", "50"]
        else:
            topo = T.generate("ring", n, base_port=free_base_port(n))
            peer_args = ["--no-train", "--dim", "2048", "--sketch-dim", "256", "--min-wait", "0", "--checkpoint-every", "50"]
        path = Path(tmp) / "topology.yaml"
        dump_topology(topo, path)
        ids = f"{topo.ids[0]}-{topo.ids[-1]}"
        with open(Path(tmp) / "stdout.log", "wb") as log:
            pr = subprocess.Popen([sys.executable, "-m", "p2pfl", "--topology", str(path), "--id", ids, "--run-dir", str(run),
                                   "--rounds", str(args.rounds), "--threads", "1", *peer_args, *extra],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
        t0 = time.monotonic()
        rows: list[tuple[int, dict[str, int]]] = []
        metrics = run / "metrics" / f"peer-{topo.ids[0]}.jsonl"
        while pr.poll() is None:
            time.sleep(args.every)
            last = read_jsonl(metrics, last=1) if metrics.exists() else []
            if last and pr.poll() is None:
                try:
                    rows.append((last[0]["round"], sample(pr.pid)))
                except (OSError, KeyError):
                    break
        wall = time.monotonic() - t0
    rounds = [r for r, _ in rows]
    out = {"bench": "soak", "peers": n, "train": args.train, "rounds": args.rounds, "exit": pr.returncode, "wall_s": round(wall, 1),
           "rounds_per_s": round(args.rounds / wall, 2), "samples": len(rows)}
    for key in ("rss_kib", "pss_kib", "fds", "threads"):
        vals = [s[key] for _, s in rows]
        out[key] = {"first": vals[0] if vals else None, "last": vals[-1] if vals else None, "max": max(vals, default=None),
                    "slope_per_1000_rounds": slope_per_1000(rounds, vals)}
    emit(out)


if __name__ == "__main__":
    main()
