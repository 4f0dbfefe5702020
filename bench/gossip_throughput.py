"""Our transport + wire path vs a bare pyzmq asyncio DEALER->ROUTER loop, same payloads, same run.

Both sides run in one uvloop process over loopback TCP. Ours: `wire.encode` of a float32 tensor
message -> `Transport.send` (bounded queue, sender task, zero-copy frames) -> ROUTER ->
`wire.decode` (full validation incl. the NaN/Inf scan). Bare: `send_multipart(copy=False)` of the
raw payload and `recv_multipart(copy=False)`. Prints one JSON line: throughput ratio per size.
usage: python bench/gossip_throughput.py [--seconds 2] [--sizes 65536,1048576,16777216]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

import torch
import uvloop
import zmq
import zmq.asyncio

from p2pfl.topology import PeerSpec
from p2pfl.transport import Transport
from p2pfl.wire import Kind, Message, TensorPayload, decode, encode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bare(nbytes: int, seconds: float) -> float:
    ctx = zmq.asyncio.Context()
    port = free_port()
    r = ctx.socket(zmq.ROUTER)
    r.bind(f"tcp://127.0.0.1:{port}")
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.SNDHWM, 64)
    d.connect(f"tcp://127.0.0.1:{port}")
    payload = torch.randn(nbytes // 4).numpy().tobytes()
    header = b"h" * 64
    done = 0

    async def sender() -> None:
        while True:
            await d.send_multipart([header, payload], copy=False)

    task = asyncio.create_task(sender())
    await r.recv_multipart(copy=False)  # warm up
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        frames = await r.recv_multipart(copy=False)
        done += len(frames[2].buffer)
    rate = done / (time.perf_counter() - t0)
    task.cancel()
    d.close(0)
    r.close(0)
    ctx.term()
    return rate


async def ours(nbytes: int, seconds: float) -> float:
    pa, pb = free_port(), free_port()
    a = Transport(PeerSpec(0, "127.0.0.1", pa), {1: PeerSpec(1, "127.0.0.1", pb)}, max_frame=64 << 20)
    b = Transport(PeerSpec(1, "127.0.0.1", pb), {0: PeerSpec(0, "127.0.0.1", pa)}, max_frame=64 << 20)
    await a.start()
    await b.start()
    x = torch.randn(nbytes // 4)
    msg = Message(Kind.DELTA, 0, tensors={"w": TensorPayload("none", (x.numel(),), {"data": x})})
    done = 0

    async def sender() -> None:
        while True:
            await a.send_wait(1, encode(msg))

    task = asyncio.create_task(sender())
    await b.recv()  # warm up
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, frames = await b.recv()
        m = decode(frames)
        done += m.tensors["w"].parts["data"].numel() * 4
    rate = done / (time.perf_counter() - t0)
    task.cancel()
    await a.close()
    await b.close()
    return rate


async def main(sizes: list[int], seconds: float) -> dict:
    out: dict = {"bench": "gossip_throughput", "seconds": seconds, "sizes": {}}
    for n in sizes:
        b1 = await bare(n, seconds)
        o1 = await ours(n, seconds)
        b2 = await bare(n, seconds)  # bracket ours to even out machine noise
        rb = (b1 + b2) / 2
        out["sizes"][str(n)] = {"ours_MBps": round(o1 / 1e6, 1), "bare_MBps": round(rb / 1e6, 1), "ratio": round(o1 / rb, 3)}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--sizes", default="65536,1048576,16777216")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(main(sizes, args.seconds))))
