"""Transport over real loopback TCP: back-pressured bulk sends lose nothing and keep order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from p2pfl.core.topology import PeerSpec
from p2pfl.net.transport import Transport

from .conftest import free_base_port

N_MESSAGES = 60
PAYLOAD = 64 << 10


async def until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Yield to the event loop until `condition()` holds; fail naming `what` after `timeout` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.01)


async def _bulk_send_before_and_after_the_receiver_exists() -> tuple[list[int], int, int]:
    base = free_base_port(2)
    a_spec, b_spec = PeerSpec(0, "127.0.0.1", base), PeerSpec(1, "127.0.0.1", base + 1)
    a = Transport(a_spec, {1: b_spec}, max_frame=1 << 20, queue_size=4, hwm=2)
    b = Transport(b_spec, {0: a_spec}, max_frame=1 << 20)
    await a.start()

    async def produce() -> None:
        for i in range(N_MESSAGES):
            await a.send_wait(1, [i.to_bytes(4, "big"), bytes(PAYLOAD)])

    producer = asyncio.create_task(produce())
    # Peer 1 is not listening yet: ZMQ_IMMEDIATE holds everything back until the producer blocks,
    # with one message held by the sender task and the queue full behind it.
    await until(lambda: 1 in a.held and a.queues[1].full(), "the producer blocked")
    sent_while_down = a.stats.messages_sent
    await b.start()
    got = []
    while len(got) < N_MESSAGES:
        ident, _, frames = await asyncio.wait_for(b.recv(), 20)
        assert ident == b"0" and len(frames[1].buffer) == PAYLOAD
        got.append(int.from_bytes(frames[0].bytes, "big"))
    await asyncio.wait_for(producer, 20)
    dropped = a.stats.dropped
    await a.close()
    await b.close()
    return got, sent_while_down, dropped


def test_send_wait_waits_for_a_late_peer_and_delivers_everything_in_order():
    got, sent_while_down, dropped = asyncio.run(_bulk_send_before_and_after_the_receiver_exists())
    assert sent_while_down == 0
    assert got == list(range(N_MESSAGES))
    assert dropped == 0


async def _flush_while_the_receiver_is_down() -> tuple[bool, int, bool, list[bytes], bool]:
    base = free_base_port(2)
    a_spec, b_spec = PeerSpec(0, "127.0.0.1", base), PeerSpec(1, "127.0.0.1", base + 1)
    a = Transport(a_spec, {1: b_spec}, max_frame=1 << 20, queue_size=16)
    b = Transport(b_spec, {0: a_spec}, max_frame=1 << 20)
    await a.start()
    offered_while_down = a.offer(1, [b"ping-while-down"])
    waiter = asyncio.create_task(a.send_wait(1, [b"stale-wait"]))
    await until(lambda: 1 in a.held, "the sender task holds the message, waiting for room at the socket")
    for i in range(5):
        assert a.send(1, [f"stale-{i}".encode()])
    assert a.queues[1].qsize() == 5  # queued behind the held one
    flushed = a.flush(1)
    await asyncio.wait_for(waiter, 5)  # it returned once queued; the flush dropped the message, not the caller
    await b.start()
    got: list[bytes] = []
    while not got or got[-1] != b"fresh":
        while not a.offer(1, [b"ping"]):  # once connected, pings go out at once
            await asyncio.sleep(0.05)
        a.send(1, [b"fresh"])
        for _ in range(2):
            _, _, frames = await asyncio.wait_for(b.recv(), 20)
            got.append(frames[0].bytes)
    idle = 1 not in a.held and a.queues[1].empty()
    await a.close()
    await b.close()
    return offered_while_down, flushed, waiter.exception() is None, got, idle


def test_flush_drops_what_waits_for_a_down_peer_so_its_next_incarnation_gets_only_fresh_messages():
    offered, flushed, caller_ok, got, idle = asyncio.run(_flush_while_the_receiver_is_down())
    assert not offered  # ZMQ_IMMEDIATE: no connection, no ping, nothing kept for later
    assert flushed == 6  # the caller's, held by the sender task, and five queued
    assert caller_ok
    assert got == [b"ping", b"fresh"]
    assert idle


async def _disconnect_before_the_receiver_is_up(grace: float, take_back: bool) -> tuple[list[bytes], bool, int]:
    """A schedule's link closed two rounds after its last use, while the peer it sent to is still
    starting: what waited on it must still arrive (or, past the grace, be dropped and counted)."""
    base = free_base_port(2)
    a_spec, b_spec = PeerSpec(0, "127.0.0.1", base), PeerSpec(1, "127.0.0.1", base + 1)
    a = Transport(a_spec, {}, max_frame=1 << 20, retire_grace=grace)
    b = Transport(b_spec, {}, max_frame=1 << 20)
    await a.start()
    a.connect(1, b_spec)
    for i in range(3):
        assert a.send(1, [f"delta-{i}".encode()])
    a.disconnect(1)
    if take_back:
        a.connect(1, b_spec)  # needed again before it closed: the same link, its queue kept in order
        a.send(1, [b"delta-3"])
    await asyncio.sleep(min(grace, 1.0) + 0.2)
    await b.start()
    got: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        while len(got) < 4:
            _, _, frames = await asyncio.wait_for(b.recv(), 3 if got or grace < 1 else 20)
            got.append(frames[0].bytes)
    if not take_back:
        await until(lambda: 1 not in a.dealers, "the retired link closed")
    still_open = 1 in a.dealers
    await a.close()
    await b.close()
    return got, still_open, a.stats.dropped


def test_a_disconnected_link_delivers_its_queue_to_a_late_peer_then_closes():
    got, still_open, dropped = asyncio.run(_disconnect_before_the_receiver_is_up(grace=30, take_back=False))
    assert got == [b"delta-0", b"delta-1", b"delta-2"] and not still_open and dropped == 0


def test_a_disconnected_link_taken_back_keeps_its_queue_and_stays_open():
    got, still_open, dropped = asyncio.run(_disconnect_before_the_receiver_is_up(grace=30, take_back=True))
    assert got == [b"delta-0", b"delta-1", b"delta-2", b"delta-3"] and still_open and dropped == 0


def test_a_disconnected_link_drops_and_counts_its_queue_after_the_grace():
    got, still_open, dropped = asyncio.run(_disconnect_before_the_receiver_is_up(grace=0.3, take_back=False))
    assert got == [] and not still_open and dropped == 3
