"""The daemon: an asyncio host of one or many peers' `node.Node` state machines.

It only moves bytes, timers and work: frames from ZeroMQ or from a co-hosted peer go to the node,
the node's actions go out as frames (co-hosted peers get them in process, through the same
encode/decode path and byte accounting as the wire), training and evaluation run one at a time in
a worker thread on the process's shared foundation model, records and checkpoints go to the run
directory. Every protocol decision is the node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from p2pfl.config import PeerConfig, worker_threads
from p2pfl.core import topology as topo_mod
from p2pfl.core.state import synthetic_state
from p2pfl.core.wire import encode, frames_nbytes
from p2pfl.errors import P2pflError
from p2pfl.host import checkpoint as ckpt
from p2pfl.host.files import JsonlWriter, load_topology, read_jsonl
from p2pfl.host.site import OpenSite
from p2pfl.net.alloc import keep_message_memory
from p2pfl.net.gatekeeper import Gatekeeper
from p2pfl.net.transport import CurveKeys, SharedContext, Transport, curve_keys
from p2pfl.node import actions as A
from p2pfl.node import node as N
from p2pfl.node import snapshot
from p2pfl.node.build import make_node
from p2pfl.node.work import copy_inputs, learner_spec, perform


class RecordSink(Protocol):
    """What receives a copy of every record this process writes, and is closed at exit."""

    def update(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


@dataclass
class Counters:
    """What one peer put on and took off the wire (TCP or in process), for its records."""

    sent: int = 0
    received: int = 0
    dropped: int = 0
    at_record: tuple[int, int] = (0, 0)


@dataclass
class Hosted:
    cfg: PeerConfig
    node: N.Node
    trainer: Any
    writer: JsonlWriter
    log: logging.LoggerAdapter
    transport: Transport | None = None
    counters: Counters = field(default_factory=Counters)
    timer: asyncio.TimerHandle | None = None
    code: int | None = None


def local_ids(topo: topo_mod.Topology) -> set[int]:
    """Peers whose host is an address of this machine (for `--id local`)."""
    mine = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    with contextlib.suppress(OSError):
        mine |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    return {p for p, s in topo.peers.items() if s.host in mine or s.host.startswith("127.")}


TrainerFactory = Callable[[PeerConfig, "topo_mod.Topology | None", int], Any]  # (peer's config, topology, worker) -> trainer or None
NodeFactory = Callable[[PeerConfig, topo_mod.Topology, N.NodeSpec, logging.Logger], N.Node]
TransportFactory = Callable[[PeerConfig, topo_mod.PeerSpec, dict[int, topo_mod.PeerSpec], "CurveKeys | None", Any, "Gatekeeper | None"],
                            Transport]


def build_trainer(cfg: PeerConfig, topo: topo_mod.Topology | None, worker: int) -> Any:
    """The peer's `learn.trainer.Trainer` (on the `worker`-th copy of the frozen model), or None
    with --no-train. Imported here: a --no-train process never loads the learning stack."""
    if cfg.no_train:
        return None
    assert topo is not None, "an open network's peers run --no-train (the command line checks it)"
    from p2pfl.config import peer_trainers, run_datasets
    from p2pfl.core.robust import flips_labels
    from p2pfl.learn.trainer import Trainer, TrainerConfig

    trainers = peer_trainers(cfg, {p: s.extra for p, s in topo.peers.items()}, str(cfg.topology))
    return Trainer(TrainerConfig.from_dict({"seed": cfg.seed, **trainers[cfg.id]}), cfg.id, topo.n, replica=worker,
                   label_flip=flips_labels(cfg.byzantine), datasets=run_datasets(trainers), rounds=cfg.rounds)


def build_transport(cfg: PeerConfig, me: topo_mod.PeerSpec, neighbours: dict[int, topo_mod.PeerSpec], curve: CurveKeys | None,
                    ctx: Any, gate: Gatekeeper | None = None) -> Transport:
    """ZeroMQ over TCP: a ROUTER at `me`, DEALERs to `neighbours` (others open on first use);
    `gate`: an open network's admission."""
    return Transport(me, neighbours, cfg.max_frame, curve=curve, ctx=ctx, retire_grace=cfg.round_timeout, gate=gate)


class Host:
    def __init__(self, cfg: PeerConfig, ids: list[int], *, trainers: TrainerFactory = build_trainer, nodes: NodeFactory = make_node,
                 transports: TransportFactory = build_transport, exporter: RecordSink | None = None,
                 site: OpenSite | None = None) -> None:
        """Peers `ids` of `cfg.topology` in this process, or of an open network's `site`.
        `trainers`, `nodes` and `transports` build each peer's parts (tests pass fakes);
        `exporter` sees every record written (the Prometheus exporter of `--metrics-port`)."""
        self.site = site
        self.topo = load_topology(cfg.topology) if site is None else None
        self.cfgs = {p: replace(cfg, id=p) for p in ids}
        self.trainers, self.nodes, self.transports = trainers, nodes, transports
        self.peers: dict[int, Hosted] = {}
        self.failed: dict[int, str] = {}
        self.curve: dict[int, CurveKeys | None] = {p: site.peers[p].keys for p in ids} if site is not None else \
            {p: curve_keys(self.topo, p, cfg.topology, cfg.secret_key if len(ids) == 1 else None) for p in ids}
        workers = worker_threads(cfg.threads, len(ids), os.cpu_count() or 1)
        # One thread per model copy: the peers of a worker share its model and train one at a time.
        self.work = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"p2pfl-work{k}") for k in range(workers)]
        self.worker_of = {p: k % workers for k, p in enumerate(ids)}
        self.prom = exporter
        self.shared: SharedContext | None = None
        self.done = asyncio.Event()
        self.died: str | None = None  # a long-running task ended: the peers stop and the process exits non-zero
        for p in ids:
            try:
                self.peers[p] = self._make(self.cfgs[p])
            except (P2pflError, OSError) as e:  # bad config, keys, checkpoint or data
                logging.getLogger(f"p2pfl.peer.{p}").error("peer %d: cannot start: %s", p, e)
                self.failed[p] = str(e)

    def _make(self, cfg: PeerConfig) -> Hosted:
        log = logging.LoggerAdapter(logging.getLogger(f"p2pfl.peer.{cfg.id}"))
        trainer = self.trainers(cfg, self.topo, self.worker_of[cfg.id])
        x0 = synthetic_state(cfg.seed, cfg.id, cfg.dim) if trainer is None else trainer.adapter_state()
        spec = N.NodeSpec(x0=x0, inc=time.time_ns() // 1000, train=trainer is not None, **learner_spec(trainer),
                          secure=self.curve[cfg.id] is not None)
        nlog = logging.getLogger(f"p2pfl.peer.{cfg.id}")
        node = self.site.node(cfg, spec, nlog) if self.site is not None else self.nodes(cfg, self.topo, spec, nlog)
        if self.curve[cfg.id] is None and self.topo is not None and cfg.id == min(self.cfgs):  # once per process
            log.warning("peer %d: NO ENCRYPTION OR AUTHENTICATION: the topology lists no public keys, so anyone who can reach "
                        "port %s can read and inject updates (run p2pfl-topology keygen)", cfg.id,
                        ", ".join(str(self.topo.peers[p].port) for p in sorted(self.cfgs)[:4]) + (" ..." if len(self.cfgs) > 4 else ""))
        metrics = cfg.run_dir / "metrics" / f"peer-{cfg.id}.jsonl"
        if cfg.resume:
            found = ckpt.load_latest(cfg.run_dir / f"peer-{cfg.id}")
            if found is None:
                log.warning("peer %d: --resume but no usable checkpoint in %s; starting fresh", cfg.id, cfg.run_dir / f"peer-{cfg.id}")
            else:
                last = max((r["round"] for r in read_jsonl(metrics)), default=-1) if metrics.exists() else -1
                node.resume(found.tensors, found.meta, last)
                if trainer is not None:
                    trainer.load_adapter_state(node.model())
                    if "optimizer" in found.meta:
                        trainer.load_optimizer_state(snapshot.join_plain(found.meta["optimizer"], found.tensors))
                log.info("peer %d: resumed from %s (round %d); next round %d", cfg.id, found.path.name, found.round, node.start_round)
        return Hosted(cfg, node, trainer, JsonlWriter(metrics), log)

    def _needs_socket(self, p: int) -> bool:
        if self.topo is None:
            return True  # an open network's peers are anywhere
        remote = [j for j in self.topo.ids if j not in self.peers]
        if not remote:
            return False
        # A schedule's peers of a round can be any peers: links open on demand (`_send`).
        scheduled = self.topo.schedule is not None
        return scheduled or self.cfgs[p].clusters != "off" or any(j not in self.peers for j in self.topo.neighbors(p))

    # ------------------------------------------------------------------ running

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        sockets = [p for p in self.peers if self._needs_socket(p)]
        gate = self.site.gate if self.site is not None else None
        if len(sockets) > 1:
            self.shared = SharedContext(self.curve[sockets[0]], gate)
        tasks = []
        for p in sockets:
            h = self.peers[p]
            if self.topo is not None:
                me, neighbors = self.topo.peers[p], {j: self.topo.peers[j] for j in self.topo.neighbors(p) if j not in self.peers}
            else:
                me, neighbors = self.site.peers[p].spec, {}  # type: ignore[union-attr]
            h.transport = self.transports(h.cfg, me, neighbors, self.curve[p], self.shared.ctx if self.shared else None, gate)
            h.transport.supervise = self._supervise
            await h.transport.start()
            tasks.append(self._supervise(asyncio.create_task(self._receive_loop(h), name=f"recv-{p}")))
        if self.site is not None:
            tasks.append(self._supervise(asyncio.create_task(self._watch_revocations(self.site), name="revocations")))
        if not self.peers:
            self.done.set()
        for h in self.peers.values():
            self._run(h, h.node.start(loop.time()))
        try:
            await self.done.wait()
        finally:
            for h in self.peers.values():
                if h.transport is not None:
                    await h.transport.drain(1.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for h in self.peers.values():
                if h.transport is not None:
                    await h.transport.close()
                h.writer.close()
            if self.shared is not None:
                self.shared.close()
            if self.prom is not None:
                self.prom.close()
            for w in self.work:
                w.shutdown(wait=True)
        bad = sorted(set(self.failed) | {p for p, h in self.peers.items() if h.code != 0})
        if self.died is not None:
            return 1
        if bad:
            logging.getLogger("p2pfl").error("peers %s failed: %s", bad, {p: self.failed.get(p, "see its log") for p in bad})
        return 1 if bad else 0

    def request_stop(self) -> None:
        loop = asyncio.get_running_loop()
        for h in self.peers.values():
            h.node.stop()
            self._run(h, h.node.tick(loop.time()))

    def _supervise(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        task.add_done_callback(self._task_ended)
        return task

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """A receive or send task must run until shutdown; one that ends with an error would leave
        its peers deaf or mute, so they stop and the process exits non-zero."""
        if task.cancelled() or task.exception() is None:
            return
        e = task.exception()
        self.died = f"task {task.get_name()} died: {type(e).__name__}: {e}"
        logging.getLogger("p2pfl").error("%s; stopping", self.died, exc_info=e)
        now = asyncio.get_running_loop().time()
        for h in self.peers.values():
            if not h.node.finished:
                self._run(h, h.node.fail(self.died, now))
        self.done.set()

    async def _watch_revocations(self, site: OpenSite) -> None:
        """Every second, the revocations new to this process, from its revocation file (read again
        when it changes) or applied by one of its peers (the gatekeeper's set), go to each peer,
        which passes on what is news to it (`node.membership.Open.revoke`): a co-hosted peer need
        not wait for a neighbour to tell it."""
        known = set(site.gate.revocations.blobs())
        while True:
            await asyncio.sleep(1.0)
            site.refresh()
            blobs = [b for b in site.gate.revocations.blobs() if b not in known]
            if not blobs:
                continue
            known.update(blobs)
            now = asyncio.get_running_loop().time()
            for h in self.peers.values():
                if not h.node.finished:
                    try:
                        self._run(h, h.node.nbh.revoke(blobs, now))  # type: ignore[attr-defined]
                    except P2pflError as e:  # Refused: one that does not verify (logged by refresh); the others applied
                        h.log.error("peer %d: %s", h.cfg.id, e)

    async def _receive_loop(self, h: Hosted) -> None:
        assert h.transport is not None
        while True:
            # No reference to a message outlives its handling: its frames go back to the allocator
            # before the next one arrives (bench/gossip_throughput.py).
            self._from_wire(h, *await h.transport.recv())

    def _from_wire(self, h: Hosted, ident: bytes, authed: int | None, frames: list[Any]) -> None:
        vouched = authed if self.curve[h.cfg.id] is not None else (int(ident) if ident.isdigit() else None)
        try:
            self._run(h, h.node.receive(frames, vouched, asyncio.get_running_loop().time()))
        except Exception as e:  # carrying out the node's answer failed: count it, keep receiving
            h.node.intake.internal_error("carrying out a message's actions", e)

    def _deliver(self, src: int, dst: int, frames: list[bytes]) -> None:
        h = self.peers[dst]
        if h.node.finished:
            return  # as a closed socket would
        if self.site is not None and self.site.revoked(src):  # what the gatekeeper does to a TCP sender
            self.site.gate.refused["revoked"] += 1
            return
        h.counters.received += frames_nbytes(frames)
        try:
            self._run(h, h.node.receive(frames, src, asyncio.get_running_loop().time()))
        except Exception as e:
            h.node.intake.internal_error("carrying out a message's actions", e)

    def _tick(self, h: Hosted) -> None:
        h.timer = None
        now = asyncio.get_running_loop().time()
        try:
            actions = h.node.tick(now)
        except Exception as e:  # a fault in a round's transition: that peer stops with it, the others go on
            h.log.exception("peer %d: internal error in round %d: %s", h.cfg.id, h.node.rnd, e)
            actions = h.node.fail(f"internal error: {type(e).__name__}: {e}", now)
        self._run(h, actions)

    def _run(self, h: Hosted, actions: list[A.Action]) -> None:
        """Carry out a node's actions, then set its timer to the node's next wake-up."""
        loop = asyncio.get_running_loop()
        for a in actions:
            if isinstance(a, A.Send):
                self._send(h, a)
            elif isinstance(a, A.Flush | A.Disconnect):
                if h.transport is not None and a.peer in h.transport.queues:
                    h.transport.flush(a.peer) if isinstance(a, A.Flush) else h.transport.disconnect(a.peer)
            elif isinstance(a, A.Train | A.Evaluate):
                self._submit(h, a)
            elif isinstance(a, A.Record):
                self._write(h, a.record)
            elif isinstance(a, A.Checkpoint):
                self._checkpoint(h, a.round)
            elif isinstance(a, A.Finish):
                h.code = a.code
                if all(x.code is not None for x in self.peers.values()):
                    self.done.set()
        if h.timer is not None:
            h.timer.cancel()
            h.timer = None
        wake = h.node.next_wakeup()
        if wake != float("inf"):
            h.timer = loop.call_at(wake, self._tick, h)

    def _send(self, h: Hosted, a: A.Send) -> None:
        if a.dest in self.peers:
            frames = [bytes(f) for f in encode(a.msg)]  # what the wire would carry, and no aliasing
            h.counters.sent += frames_nbytes(frames)
            asyncio.get_running_loop().call_soon(self._deliver, h.cfg.id, a.dest, frames)
            return
        t = h.transport
        if t is None:
            h.counters.dropped += 1
            return
        # A PPFM overlay peer that is not a base neighbour, a schedule's peer, an open network's
        # new link: opened on first use, and taken back if it is still retiring.
        spec = self.topo.peers[a.dest] if self.topo is not None else \
            self.site.address(a.dest, h.node.nbh.views.contact(a.dest))  # type: ignore[union-attr, attr-defined]
        if spec is None:
            h.counters.dropped += 1
            return
        t.connect(a.dest, spec)
        (t.offer if a.offer else t.send)(a.dest, encode(a.msg))

    def _submit(self, h: Hosted, a: A.Train | A.Evaluate) -> None:
        """Run the work on the peer's worker thread; the answer goes back to the node on the loop."""
        loop = asyncio.get_running_loop()
        work = copy_inputs(a)  # the node's tensors keep changing while the work waits its turn

        def answer(fut: asyncio.Future[tuple[dict[str, Any], Any]]) -> None:
            now = loop.time()
            try:
                metrics, out = fut.result()
            except Exception as e:  # the trainer of one peer fails; the others go on
                h.log.exception("peer %d: %s failed: %s", h.cfg.id, type(a).__name__.lower(), e)
                self._run(h, h.node.fail(f"{type(a).__name__.lower()} failed: {e}", now))
                return
            try:
                self._run(h, h.node.trained(metrics, out, now) if isinstance(a, A.Train) else h.node.evaluated(metrics, now))
            except Exception as e:  # a fault in the round's next transition: that peer stops with it, as in `_tick`
                h.log.exception("peer %d: internal error in round %d: %s", h.cfg.id, h.node.rnd, e)
                self._run(h, h.node.fail(f"internal error: {type(e).__name__}: {e}", now))

        fut = loop.run_in_executor(self.work[self.worker_of[h.cfg.id]], perform, h.trainer, work, h.node.spec.augment, time.perf_counter)
        fut.add_done_callback(answer)

    def _write(self, h: Hosted, rec: dict[str, Any]) -> None:
        c, t = h.counters, h.transport
        sent = c.sent + (t.stats.bytes_sent if t else 0)
        received = c.received + (t.stats.bytes_received if t else 0)
        at = rec.pop("at", None)  # records wait for their consensus estimate: stamp the round's end, not the write
        wall = time.time() - (asyncio.get_running_loop().time() - at if at is not None else 0.0)
        rec.update(time=wall, bytes_sent=sent - c.at_record[0], bytes_received=received - c.at_record[1],
                   dropped_messages=c.dropped + (t.stats.dropped if t else 0))
        c.at_record = (sent, received)
        if self.site is not None:  # the process's gatekeeper: refused messages and handshakes by reason
            gate = self.site.gate
            rec["admission_refused"] = dict(gate.refused + gate.handshakes_refused)
        h.writer.write(rec)
        if self.prom is not None:
            self.prom.update(rec)

    def _checkpoint(self, h: Hosted, rnd: int) -> None:
        peer_dir = h.cfg.run_dir / f"peer-{h.cfg.id}"
        ckpt.save_state(peer_dir / "adapter.safetensors", h.node.model(), {"round": str(h.node.round), "peer": str(h.cfg.id)})
        tensors, meta = h.node.checkpoint_state()
        if h.trainer is not None:
            meta["optimizer"] = snapshot.split_plain(h.trainer.optimizer_state(), "opt", tensors)
        ckpt.save(peer_dir, rnd, tensors, meta)


def run_peers(cfg: PeerConfig, ids: list[int], exporter: RecordSink | None = None,
              started: Callable[[Host], None] | None = None, site: OpenSite | None = None) -> int:
    """Host `ids` until they finish. `started` sees the host on its loop once built (a Ray actor
    keeps it, to stop the peers from another thread); SIGTERM/SIGINT stop them in the main thread."""
    import signal
    import threading

    import uvloop

    torch.set_num_threads(1)
    if cfg.keep_memory and not keep_message_memory():
        logging.getLogger("p2pfl").info("no glibc mallopt here; allocator left as it is")

    async def main() -> int:
        host = Host(cfg, ids, exporter=exporter, site=site)
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, host.request_stop)
        if started is not None:
            started(host)
        return await host.run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
