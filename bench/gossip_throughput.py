"""Our transport + wire path vs a bare pyzmq asyncio DEALER->ROUTER loop, same payloads, same run.

As in a deployment, sender and receiver are separate processes (one per peer), each with its own
uvloop and ZeroMQ context, over loopback TCP. Ours: `wire.encode` of a float32 tensor message ->
`Transport.send_wait` (bounded queue, zero-copy frames) -> ROUTER -> `Transport.recv` ->
`wire.decode` exactly as the daemon calls it (full header, descriptor and size validation; the
NaN/Inf check happens where the daemon reads the values, in the codec). A third arm,
`ours_scanned`, also scans every value on the wire level (`check_finite=True`). Bare:
`send_multipart(copy=False)` of the raw payload and `recv_multipart(copy=False)`, nothing else.
Every process of these arms runs with the allocator settings a peer uses (`p2pfl.net.alloc`), so the
ratio isolates the code path; `--alloc default` runs them all on glibc's defaults instead. One more
bare arm on glibc's defaults gives `alloc_speedup`, what those settings are worth by themselves.
Trials alternate the arms (in rotating order) and each reported ratio is the median of the per-trial
ratios to the bare run beside it, which cancels most of a shared machine's drift. A second bare arm
(`ratio_bare_again`, the same loop measured twice) shows how far the ratio strays on this machine
when nothing differs. Prints one JSON line.
usage: python bench/gossip_throughput.py [--seconds 1.5] [--trials 3] [--sizes 65536,1048576,16777216] [--alloc keep|default]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch
import uvloop
import zmq
import zmq.asyncio
from common import emit

from p2pfl.core.topology import PeerSpec
from p2pfl.core.wire import Kind, Message, TensorPayload, decode, encode
from p2pfl.net.alloc import keep_message_memory
from p2pfl.net.ports import free_base_port
from p2pfl.net.transport import Transport

HOST = "127.0.0.1"


# ------------------------------------------------------------------ senders (child processes)


async def _send_bare(port: int, nbytes: int) -> None:
    ctx = zmq.asyncio.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.SNDHWM, 64)
    d.connect(f"tcp://{HOST}:{port}")
    payload = torch.randn(nbytes // 4).numpy().tobytes()
    header = b"h" * 64
    while True:
        await d.send_multipart([header, payload], copy=False)


async def _send_ours(port: int, own_port: int, nbytes: int) -> None:
    t = Transport(PeerSpec(0, HOST, own_port), {1: PeerSpec(1, HOST, port)}, max_frame=64 << 20)
    await t.start()
    x = torch.randn(nbytes // 4)
    msg = Message(Kind.DELTA, 0, tensors={"w": TensorPayload("none", (x.numel(),), {"data": x})})
    while True:
        await t.send_wait(1, encode(msg))


def _sender(kind: str, port: int, own_port: int, nbytes: int, keep: bool) -> None:
    _process_setup(keep)
    coro = _send_bare(port, nbytes) if kind == "bare" else _send_ours(port, own_port, nbytes)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# ------------------------------------------------------------------ receivers (this process)


async def _recv_bare(port: int, seconds: float, start: Any) -> float:
    ctx = zmq.asyncio.Context()
    r = ctx.socket(zmq.ROUTER)
    r.bind(f"tcp://{HOST}:{port}")
    start()
    await r.recv_multipart(copy=False)  # warm up: the sender is connected and running
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # as in ours, no message outlives its iteration
        done += len((await r.recv_multipart(copy=False))[2].buffer)
    rate = done / (time.perf_counter() - t0)
    r.close(0)
    ctx.term()
    return rate


def _take(ident: bytes, authed: int | None, frames: list[Any], scan: bool) -> int:
    """Bytes of one message, decoded as `Peer._handle` decodes it; like there, nothing of the message
    is left referenced when the receive loop waits for the next one."""
    return decode(frames, 64 << 20, check_finite=scan).tensors["w"].parts["data"].numel() * 4


async def _recv_ours(port: int, sender_port: int, seconds: float, start: Any, scan: bool) -> float:
    t = Transport(PeerSpec(1, HOST, port), {0: PeerSpec(0, HOST, sender_port)}, max_frame=64 << 20)
    await t.start()
    start()
    await t.recv()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += _take(*await t.recv(), scan)
    rate = done / (time.perf_counter() - t0)
    await t.close()
    return rate


def _process_setup(keep: bool) -> None:
    torch.set_num_threads(1)
    if keep and not keep_message_memory():
        raise SystemExit("this C library takes no mallopt settings: run with --alloc default")


def _receiver(kind: str, nbytes: int, seconds: float, keep: bool, result: Any) -> None:
    """One trial in a fresh receiver process, which starts its fresh sender process."""
    _process_setup(keep)
    port = free_base_port(2)
    sender_port = port + 1
    sender = "bare" if kind.startswith("bare") else "ours"
    proc = mp.get_context("spawn").Process(target=_sender, args=(sender, port, sender_port, nbytes, keep), daemon=True)
    if sender == "bare":
        recv = _recv_bare(port, seconds, proc.start)
    else:
        recv = _recv_ours(port, sender_port, seconds, proc.start, scan=kind == "ours_scanned")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result.put(runner.run(recv))
    finally:
        proc.kill()
        proc.join()


def trial(kind: str, nbytes: int, seconds: float, keep: bool) -> float:
    """Bytes per second received over `seconds`."""
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(kind, nbytes, seconds, keep, result))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{kind} trial at {nbytes} bytes: receiver exited with {proc.exitcode}")
    return result.get(timeout=10)


def main(sizes: list[int], seconds: float, trials: int, keep: bool = True) -> dict:
    out: dict = {"bench": "gossip_throughput", "seconds": seconds, "trials": trials, "alloc": "keep" if keep else "default", "sizes": {}}
    kinds = ["bare", "bare_again", "ours", "ours_scanned"] + (["bare_glibc"] if keep else [])
    for n in sizes:
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(trials):  # rotate the order so that no arm always runs first
            r = i % len(kinds)
            for kind in kinds[r:] + kinds[:r]:
                rates[kind].append(trial(kind, n, seconds, keep and kind != "bare_glibc"))
        row: dict = {"bare_MBps": round(statistics.median(rates["bare"]) / 1e6, 1)}
        for kind, key in (("ours", "ratio"), ("ours_scanned", "ratio_scanned"), ("bare_again", "ratio_bare_again")):
            ratios = [o / b for o, b in zip(rates[kind], rates["bare"], strict=True)]
            row[f"{kind}_MBps"] = round(statistics.median(rates[kind]) / 1e6, 1)
            row[key] = round(statistics.median(ratios), 3)
            row[key.replace("ratio", "ratios", 1)] = [round(r, 3) for r in ratios]
        if keep:
            row["bare_glibc_MBps"] = round(statistics.median(rates["bare_glibc"]) / 1e6, 1)
            row["alloc_speedup"] = round(statistics.median(b / g for b, g in zip(rates["bare"], rates["bare_glibc"], strict=True)), 3)
        out["sizes"][str(n)] = row
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--sizes", default="65536,1048576,16777216")
    ap.add_argument("--alloc", choices=("keep", "default"), default="keep", help="allocator settings of every process of the main arms")
    args = ap.parse_args()
    emit(main([int(s) for s in args.sizes.split(",")], args.seconds, args.trials, args.alloc == "keep"))
