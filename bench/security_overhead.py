"""What CurveZMQ costs: throughput and round time with keys vs without, as ratios, in one run.

1. Transport: two `Transport`s over loopback TCP, one sending `wire.encode`d float32 deltas to the
   other (bounded queue, sender task, ROUTER, full `wire.decode` validation), without and with
   `CurveKeys` (CURVE handshake, ZAP allow-list, per-frame encryption and User-Id lookup). The
   plaintext run brackets the CURVE run (before and after) to even out machine noise.
2. Cluster: a ring-4 `--no-train` cluster, one OS process per peer, without and with keys from
   `p2pfl-topology keygen`; mean `round_s` of every peer's records (the first 2 rounds, which
   include connection setup, left out). `--min-wait 60` keeps deadlines out of the timing.

Prints one JSON line: {"transport": {size: {plain_MBps, curve_MBps, ratio}}, "cluster": {...}}.
usage: python bench/security_overhead.py [--seconds 2] [--sizes 65536,1048576] [--rounds 20] [--dim 131072]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import uvloop
import zmq
from common import emit

from p2pfl.core import topology as T
from p2pfl.core.topology import PeerSpec
from p2pfl.core.wire import Kind, Message, TensorPayload, decode, encode
from p2pfl.host.files import dump_topology, read_jsonl
from p2pfl.net.ports import free_base_port
from p2pfl.net.transport import CurveKeys, Transport
from p2pfl.ops.cli import topology_main

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ transport

async def transport_rate(nbytes: int, seconds: float, curve: bool) -> float:
    pa = free_base_port(2)
    pb = pa + 1
    ka, kb = (None, None)
    if curve:
        (pub_a, sec_a), (pub_b, sec_b) = zmq.curve_keypair(), zmq.curve_keypair()
        peers = {0: pub_a, 1: pub_b}
        ka, kb = CurveKeys(pub_a, sec_a, peers), CurveKeys(pub_b, sec_b, peers)
    a = Transport(PeerSpec(0, "127.0.0.1", pa), {1: PeerSpec(1, "127.0.0.1", pb)}, max_frame=64 << 20, curve=ka)
    b = Transport(PeerSpec(1, "127.0.0.1", pb), {0: PeerSpec(0, "127.0.0.1", pa)}, max_frame=64 << 20, curve=kb)
    await a.start()
    await b.start()
    x = torch.randn(nbytes // 4)
    msg = Message(Kind.DELTA, 0, tensors={"w": TensorPayload("none", (x.numel(),), {"data": x})})

    async def sender() -> None:
        while True:
            await a.send_wait(1, encode(msg))

    task = asyncio.create_task(sender())
    _, authed, _ = await b.recv()  # warm up (and the handshake)
    assert authed == (0 if curve else None), authed
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, frames = await b.recv()
        done += decode(frames).tensors["w"].parts["data"].numel() * 4
    rate = done / (time.perf_counter() - t0)
    task.cancel()
    await a.close()
    await b.close()
    return rate


async def transport_bench(sizes: list[int], seconds: float) -> dict[str, dict[str, float]]:
    out = {}
    for n in sizes:
        p1 = await transport_rate(n, seconds, curve=False)
        c = await transport_rate(n, seconds, curve=True)
        p2 = await transport_rate(n, seconds, curve=False)
        plain = (p1 + p2) / 2
        out[str(n)] = {"plain_MBps": round(plain / 1e6, 1), "curve_MBps": round(c / 1e6, 1), "ratio": round(c / plain, 3)}
    return out


# -------------------------------------------------------------------------------- cluster

def run_cluster(tmp: Path, keyed: bool, rounds: int, dim: int) -> dict[str, float]:
    name = "keyed" if keyed else "plain"
    topo = T.generate("ring", 4, base_port=free_base_port(4))
    (tmp / name).mkdir()
    path = tmp / name / "ring-4.yaml"
    dump_topology(topo, path)
    if keyed:
        with open(os.devnull, "w") as null:
            stdout, sys.stdout = sys.stdout, null
            try:
                topology_main(["keygen", "--topology", str(path)])
            finally:
                sys.stdout = stdout
    run = tmp / name / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--rounds", str(rounds), "--no-train", "--dim", str(dim), "--min-wait", "60", "--peer-timeout", "60"]
    procs = []
    t0 = time.perf_counter()
    for p in topo.ids:
        log = open(run / f"stdout-{p}.log", "wb")  # noqa: SIM115 - the child owns it
        procs.append(subprocess.Popen([sys.executable, "-m", "p2pfl", "--topology", str(path), "--id", str(p),
                                       "--run-dir", str(run), *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    codes = [pr.wait(timeout=600) for pr in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"{name} cluster failed: exit codes {codes}; see {run}")
    round_s = [r["round_s"] for p in topo.ids for r in read_jsonl(run / "metrics" / f"peer-{p}.jsonl") if r["round"] >= 2]
    warned = sum("NO ENCRYPTION" in (run / "logs" / f"peer-{p}.log").read_text() for p in topo.ids)
    assert warned == (0 if keyed else 4), (name, warned)
    return {"round_s_mean": statistics.fmean(round_s), "round_s_median": statistics.median(round_s), "wall_s": wall}


def cluster_bench(rounds: int, dim: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="p2pfl-secbench-") as d:
        plain = run_cluster(Path(d), False, rounds, dim)
        keyed = run_cluster(Path(d), True, rounds, dim)
    return {
        "topology": "ring-4",
        "rounds": rounds,
        "dim": dim,
        "plain_round_s": round(plain["round_s_mean"], 4),
        "curve_round_s": round(keyed["round_s_mean"], 4),
        "ratio": round(keyed["round_s_mean"] / plain["round_s_mean"], 3),
        "median_ratio": round(keyed["round_s_median"] / plain["round_s_median"], 3),
        "plain_wall_s": round(plain["wall_s"], 1),
        "curve_wall_s": round(keyed["wall_s"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--sizes", default="65536,1048576")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--dim", type=int, default=131072)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        transport = runner.run(transport_bench(sizes, args.seconds))
    out = {"bench": "security_overhead", "seconds": args.seconds, "transport": transport,
           "cluster": cluster_bench(args.rounds, args.dim), "cpus": os.cpu_count(), "load1": round(os.getloadavg()[0], 2)}
    emit(out)


if __name__ == "__main__":
    main()
