"""The peer daemon: wires trainer, CHOCO engine, sketches and transport into rounds.

Everything protocol-shaped is decided by the sans-IO pieces (`gossip`, `consensus`, `wire`);
this module owns the clocks (heartbeats, adaptive round deadlines), the sockets and the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq.auth

from p2pfl import checkpoint as ckpt
from p2pfl import topology as topo_mod
from p2pfl.alloc import keep_message_memory
from p2pfl.consensus import SketchBook, Sketcher, flatten
from p2pfl.gossip import ChocoEngine, GossipError
from p2pfl.metrics import JsonlWriter, PromExporter, RecordQueue, read_jsonl
from p2pfl.ppfm import Levels, PpfmConfig, level_distances, parse_clusters
from p2pfl.state import save_state, synthetic_state
from p2pfl.transport import CurveKeys, Transport
from p2pfl.wire import (
    BASE,
    CLUSTER,
    GLOBAL,
    Kind,
    Message,
    TensorPayload,
    WireError,
    all_finite,
    decode,
    encode,
)

SKETCH_TENSOR = "_sketches"
FINGERPRINT_TENSOR = "_fingerprints"  # PPFM update fingerprints, flooded like the sketches


@dataclass
class PeerConfig:
    topology: Path
    id: int
    rounds: int = 50
    run_dir: Path = Path("runs/default")
    seed: int = 0
    no_train: bool = False
    dim: int = 131072  # --no-train state size (floats)
    compress: str = "none"
    gamma: float | None = None
    sketch_dim: int = 1024
    heartbeat: float = 1.0  # seconds between heartbeats
    peer_timeout: float = 10.0  # silent this long => marked down
    min_wait: float = 2.0  # floor of the adaptive round deadline
    round_timeout: float = 120.0  # ceiling of the adaptive round deadline
    startup_timeout: float = 60.0
    max_frame: int = 256 * 1024 * 1024
    keep_memory: bool = True  # fixed glibc malloc thresholds: received messages reuse freed pages (p2pfl.alloc)
    checkpoint_every: int = 0
    resume: bool = False
    robust: str = "off"  # off, clip[:TAU], trimmed:B, median
    norm_factor: float = 0.0  # reject deltas this many times the recent median norm (0: off, the default)
    byzantine: str = "off"  # fault injection for experiments: scale:F or noise:S (this peer misbehaves)
    metrics_port: int = 0  # serve Prometheus metrics on 127.0.0.1:PORT (0: off)
    metrics_host: str = "127.0.0.1"
    secret_key: Path | None = None  # CurveZMQ secret key file; default <topology dir>/keys/peer-<id>.key_secret
    round_period: float = 0.0  # a round lasts at least this long (paced gossip)
    max_lag: int = 10  # neighbours more rounds behind than this are neither waited for nor mixed
    clusters: str = "off"  # PPFM meta-levels: off, auto, or a fixed number of clusters
    recluster_every: int = 5  # R: rounds between cluster evaluations
    global_every: int = 5  # K: rounds between global-level gossip among representatives
    global_lambda: float = 0.05  # pull of each cluster model toward the global model
    cluster_beta: float = 1.0  # Reptile step of the cluster model toward its members' task models
    cluster_margin: float = 0.1  # hysteresis: silhouette gain a new clustering needs
    fingerprint_dim: int = 256  # rows of the fingerprint sketch
    trainer: dict[str, Any] = field(default_factory=dict)


class LogLimiter:
    """Log the first few of a kind of event, then every 1000th: hostile input must not flood the log."""

    def __init__(self, first: int = 20, every: int = 1000) -> None:
        self.first, self.every, self.count = first, every, 0

    def __call__(self) -> bool:
        self.count += 1
        return self.count <= self.first or self.count % self.every == 0


class Peer:
    def __init__(self, cfg: PeerConfig) -> None:
        self.cfg = cfg
        self.topo = topo_mod.load(cfg.topology)
        if cfg.id not in self.topo.peers:
            raise topo_mod.TopologyError(f"--id: peer {cfg.id} is not in {cfg.topology} (ids {self.topo.ids})")
        self.me = cfg.id
        self.neighbors = self.topo.neighbors(self.me)
        self.run_dir = Path(cfg.run_dir)
        self.log = logging.getLogger(f"p2pfl.peer.{self.me}")
        self.trainer: Any = None
        if cfg.no_train:
            x0 = synthetic_state(cfg.seed, self.me, cfg.dim)
        else:
            from p2pfl.trainer import Trainer, TrainerConfig

            self.trainer = Trainer(TrainerConfig.from_dict({"seed": cfg.seed, **cfg.trainer}), self.me, self.topo.n)
            x0 = self.trainer.adapter_state()
        weights = self.topo.mh_weights(self.me)
        weights.pop(self.me)
        self.inc = time.time_ns() // 1000  # grows across restarts, so an older incarnation is a replay
        self.engine = ChocoEngine(self.me, weights, x0, cfg.compress, cfg.gamma, seed=cfg.seed, inc=self.inc, robust=cfg.robust, norm_factor=cfg.norm_factor)
        self.attack = parse_byzantine(cfg.byzantine)
        dim = flatten(x0).numel()
        self.sketcher = Sketcher(dim, cfg.sketch_dim, cfg.seed) if cfg.sketch_dim > 0 else None
        self.diameter = self.topo.diameter()
        self.book = SketchBook(self.me, self.topo.ids, horizon=self.diameter + 2)
        # PPFM: with clustering on, the base engine only paces rounds and floods sketches and
        # fingerprints (empty deltas); the model travels on the cluster and global channels.
        k = parse_clusters(cfg.clusters)
        self.levels: Levels | None = None
        if k is not None:
            pcfg = PpfmConfig(k=k, recluster_every=cfg.recluster_every, global_every=cfg.global_every, lam=cfg.global_lambda,
                              beta=cfg.cluster_beta, margin=cfg.cluster_margin, fingerprint_dim=cfg.fingerprint_dim, lag=self.diameter + 1)
            self.levels = Levels(self.me, self.topo, x0, pcfg, cfg.compress, cfg.gamma, seed=cfg.seed, inc=self.inc)
        self.fbook = SketchBook(self.me, self.topo.ids, horizon=self.diameter + 2)
        self.overlay_seen: dict[int, float] = {}  # overlay peers that are not base neighbours
        self.overlay_down: set[int] = set()
        self.labels_at: dict[int, dict[int, int]] = {}  # sketch round -> clustering its record reports
        self.records = RecordQueue(give_up_after=self.diameter + 2)
        self.curve = curve_keys(self.topo, self.me, cfg)
        if self.curve is None:
            self.log.warning("peer %d: NO ENCRYPTION OR AUTHENTICATION: the topology lists no public keys, so anyone who "
                             "can reach port %d can read and inject updates (run p2pfl-topology keygen)", self.me, self.topo.peers[self.me].port)
        self.transport = Transport(self.topo.peers[self.me], {j: self.topo.peers[j] for j in self.neighbors}, cfg.max_frame, curve=self.curve)
        self.last_seen: dict[int, float] = {}
        self.live: set[int] = set()
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}
        self._log_reject = LogLimiter()
        self._progress = asyncio.Event()
        self.wait_ewma: float | None = None
        self.round = -1
        self.start_round = 0
        self._next_round_at = 0.0
        self.neighbor_round: dict[int, int] = {}
        self.resumed: ckpt.Checkpoint | None = None
        self.peer_dir = self.run_dir / f"peer-{self.me}"
        self.metrics_path = self.run_dir / "metrics" / f"peer-{self.me}.jsonl"
        if cfg.resume:
            self._resume()
        self.writer = JsonlWriter(self.metrics_path)
        self.prom = PromExporter(cfg.metrics_port, self.me, cfg.metrics_host) if cfg.metrics_port else None
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ network

    def _send(self, peer: int, msg: Message) -> None:
        if peer not in self.transport.dealers:  # a PPFM overlay peer that is not a base neighbour
            self.transport.connect(peer, self.topo.peers[peer])
            self.overlay_seen.setdefault(peer, time.monotonic())
        self.transport.send(peer, encode(msg))

    def _ping(self, peer: int, msg: Message, down: bool) -> None:
        """A periodic control message: queued for a peer that is up, sent now or never to one that
        is down (a queue would hand its next incarnation old rounds first)."""
        if down:
            self.transport.offer(peer, encode(msg))
        else:
            self._send(peer, msg)

    def _broadcast_control(self, msg: Message, to: list[int] | None = None) -> None:
        for j in self.neighbors if to is None else to:
            self._ping(j, msg, down=j not in self.live)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected += 1
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
        if self._log_reject():
            self.log.warning("peer %d: rejected message (%s): %s [total %d]", self.me, reason, detail, self.rejected)

    async def _receive_loop(self) -> None:
        while True:
            # No reference to a message outlives its handling: its frames go back to the allocator
            # before the next message arrives. Holding one across the wait put 16 MiB messages at
            # 560-790 fresh page faults each, against 30-50 (bench/gossip_throughput.py).
            self._handle(*await self.transport.recv())

    def _handle(self, ident: bytes, authed: int | None, frames: list[Any]) -> None:
        try:
            # Values are checked where they are read: codecs refuse non-finite output before
            # anything reaches a replica, `_take_sketches` checks the float64 blocks. A wire-level
            # scan too would read every byte once more (~10% of throughput at 16 MiB).
            msg = decode(frames, self.cfg.max_frame, check_finite=False)
        except WireError as e:
            self._reject("wire", str(e))
            return
        if self.curve is not None and authed != msg.sender:
            self._reject("identity", f"CURVE key of peer {authed} sent a message claiming to be peer {msg.sender}")
            return
        if self.curve is None and ident != str(msg.sender).encode():
            self._reject("identity", f"routing id {ident[:32]!r} claims to be peer {msg.sender}")
            return
        if msg.channel != BASE:
            self._receive_level(msg)
            return
        if msg.sender not in self.engine.replicas:
            self._reject("unknown-peer", f"peer {msg.sender} is not a neighbour")
            return
        try:
            self._take_sketches(msg)
            actions = self.engine.receive(msg)
        except GossipError as e:
            self._reject("protocol", str(e))
            return
        self.neighbor_round[msg.sender] = max(self.neighbor_round.get(msg.sender, 0), msg.round)
        self._mark_seen(msg.sender, alive=msg.kind != Kind.BYE)
        for dest, reply in actions:
            self._send(dest, reply)
        self._progress.set()

    def _receive_level(self, msg: Message) -> None:
        """A PPFM cluster- or global-channel message: to that level's engine."""
        if self.levels is None:
            self._reject("channel", f"{msg.channel}-channel message from peer {msg.sender}, but clustering is off here")
            return
        try:
            actions = self.levels.receive(msg)
        except GossipError as e:
            self._reject("protocol", str(e))
            return
        if msg.kind == Kind.BYE:
            self.overlay_down.add(msg.sender)
        else:
            self.overlay_seen[msg.sender] = time.monotonic()
            self.overlay_down.discard(msg.sender)
        for dest, reply in actions:
            self._send(dest, reply)
        self._progress.set()

    def _blocks(self) -> list[tuple[str, str, SketchBook, int]]:
        """(tensor name, info key, book, row length) of what base-channel messages flood."""
        out = [(SKETCH_TENSOR, "sketches", self.book, self.sketcher.k if self.sketcher else -1)]
        if self.levels is not None:
            out.append((FINGERPRINT_TENSOR, "fingerprints", self.fbook, self.levels.cfg.fingerprint_dim))
        return out

    def _take_sketches(self, msg: Message) -> None:
        for name, key, book, k in self._blocks():
            tp = msg.tensors.pop(name, None)
            if tp is None:
                continue
            keys = msg.info.get(key)
            data = tp.parts.get("data")
            if (
                not isinstance(keys, list)
                or data is None
                or data.dtype != torch.float64
                or tuple(data.shape) != (len(keys), k)
                or not all(isinstance(e, list) and len(e) == 2 and all(isinstance(v, int) for v in e) for e in keys)
            ):
                raise GossipError(f"{key} from peer {msg.sender}: malformed block (keys/shape/dtype; rows of {k} float64 expected)")
            if not all_finite(data):
                raise GossipError(f"{key} from peer {msg.sender}: contains NaN or Inf")
            for (origin, rnd), row in zip(keys, data, strict=True):
                book.add(origin, rnd, row.clone(), via=msg.sender)
        if FINGERPRINT_TENSOR in msg.tensors:
            raise GossipError(f"fingerprints from peer {msg.sender}: clustering is off here")

    def _with_sketches(self, msg: Message, peer: int) -> Message:
        tensors, info = dict(msg.tensors), dict(msg.info)
        for name, key, book, _ in self._blocks():
            out = book.outgoing(peer, max(self.round, 0))
            if out:
                data = torch.stack([s for _, _, s in out])
                tensors[name] = TensorPayload(codec="none", shape=tuple(data.shape), parts={"data": data})
                info[key] = [[o, r] for o, r, _ in out]
        return Message(msg.kind, msg.sender, msg.round, msg.seq, msg.inc, tensors, info)

    def _mark_seen(self, peer: int, alive: bool = True) -> None:
        now = time.monotonic()
        self.last_seen[peer] = now if alive else -math.inf
        if alive and peer not in self.live:
            self.live.add(peer)
            self.log.info("peer %d: neighbour %d is up", self.me, peer)
        elif not alive and peer in self.live:
            self.live.discard(peer)
            self.transport.flush(peer)
            self.log.info("peer %d: neighbour %d said goodbye", self.me, peer)
            self._progress.set()

    def _mark_down(self, peer: int, why: str) -> None:
        self.live.discard(peer)
        self.transport.flush(peer)
        self.log.warning("peer %d: neighbour %d is down (%s); its weight moves to self", self.me, peer, why)
        self._progress.set()

    def _extra_overlay(self) -> list[int]:
        """PPFM overlay peers that are not base-graph neighbours (no base heartbeats from them)."""
        return sorted(self.levels.overlay_peers() - set(self.neighbors)) if self.levels is not None else []

    async def _heartbeat_loop(self) -> None:
        while True:
            self._broadcast_control(self.engine.heartbeat())
            now = time.monotonic()
            for j in list(self.live):
                if now - self.last_seen.get(j, -math.inf) > self.cfg.peer_timeout:
                    self._mark_down(j, f"silent for {self.cfg.peer_timeout:.1f}s")
            for j in self._extra_overlay():
                assert self.levels is not None
                beat = self.levels.control(CLUSTER if j in self.levels.cluster_neighbors else GLOBAL, "heartbeat")
                self._ping(j, beat, down=j in self.overlay_down)
                if j not in self.overlay_down and now - self.overlay_seen.get(j, now) > self.cfg.peer_timeout:
                    self.overlay_down.add(j)
                    self.transport.flush(j)
                    self.log.warning("peer %d: overlay peer %d is down (silent for %.1fs)", self.me, j, self.cfg.peer_timeout)
                    self._progress.set()
            await asyncio.sleep(self.cfg.heartbeat)

    # -------------------------------------------------------------------- rounds

    def _deadline(self) -> float:
        if self.wait_ewma is None:
            return self.cfg.round_timeout
        return min(self.cfg.round_timeout, max(self.cfg.min_wait, 4.0 * self.wait_ewma + 0.5))

    async def _wait_round(self, rnd: int) -> tuple[float, list[int]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self._deadline()
        while self._waiting_for(rnd):
            left = deadline - loop.time()
            if left <= 0:
                late = self._waiting_for(rnd)
                self.log.warning("peer %d: round %d deadline passed; mixing without %s", self.me, rnd, late)
                return loop.time() - start, late
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=min(left, 0.5))
        waited = loop.time() - start
        self.wait_ewma = waited if self.wait_ewma is None else 0.8 * self.wait_ewma + 0.2 * waited
        return waited, []

    def _waiting_for(self, rnd: int) -> list[int]:
        late = self.engine.waiting_for(rnd, self._participants(rnd))
        if self.levels is not None and rnd < self.cfg.rounds:
            late += self.levels.waiting_for(rnd, self._overlay_live(rnd))
        return sorted(set(late))

    def _overlay_live(self, rnd: int) -> set[int]:
        """Overlay peers to wait for and mix with: live base neighbours, and the others unless down."""
        assert self.levels is not None
        return self._participants(rnd) | {j for j in self._extra_overlay() if j not in self.overlay_down}

    async def _recluster(self, rnd: int) -> None:
        """Cluster the fingerprints of round rnd - lag, once every peer's has arrived.

        Flooding needs at most `diameter` rounds and the lag is one more, so the set is normally
        complete; if it is not (lost messages), this evaluation is skipped with a warning rather
        than clustered on a partial set that other peers would not share."""
        assert self.levels is not None
        src = self.levels.fingerprint_round(rnd)
        if src is None:
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + self.cfg.min_wait
        while not self.fbook.complete(src) and loop.time() < end:
            await self._tick(0.1)
        if not self.fbook.complete(src):
            have = sorted(p for p in self.topo.ids if (p, src) in self.fbook.entries)
            self.log.warning("peer %d: round %d: fingerprints of round %d only from %s; clustering skipped", self.me, rnd, src, have)
            return
        old_extra = set(self._extra_overlay())
        try:
            changed = self.levels.recluster(rnd, {p: self.fbook.entries[(p, src)] for p in self.topo.ids})
        except ValueError as e:
            self.log.error("peer %d: round %d: clustering failed: %s", self.me, rnd, e)
            return
        if changed:
            lv = self.levels
            self.log.info("peer %d: round %d: clusters %s; mine %d (size %d, representative %d), overlay neighbours %s",
                          self.me, rnd, lv.labels, lv.labels[self.me], len(lv.members), lv.rep, sorted(lv.overlay_peers()))
            for j in old_extra - set(self._extra_overlay()):
                self.transport.disconnect(j)
                self.overlay_seen.pop(j, None)
                self.overlay_down.discard(j)
            now = time.monotonic()
            for j in self._extra_overlay():
                self.overlay_seen.setdefault(j, now)

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.cfg.startup_timeout
        while set(self.neighbors) - self.live and loop.time() < end:
            self._broadcast_control(self.engine.hello(), [j for j in self.neighbors if j not in self.live])
            await self._tick(0.25)
        missing = sorted(set(self.neighbors) - self.live)
        if missing:
            self.log.warning("peer %d: starting without neighbours %s (not seen in %.0fs)", self.me, missing, self.cfg.startup_timeout)
        # One more hello so neighbours that saw us before we saw them have our latest state.
        self._broadcast_control(self.engine.hello())
        running = {j: r for j, r in self.neighbor_round.items() if j in self.live and r > 0}
        if running:
            await self._catch_up(running, end)

    async def _tick(self, timeout: float) -> None:
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout=timeout)

    async def _catch_up(self, running: dict[int, int], end: float) -> None:
        """Join a network that is already running: resync replicas, then jump to its round.

        A peer without a checkpoint starts from a neighbour's current model (its exact xhat);
        a resumed peer keeps its own model. Both start at the slowest live neighbour's round, so
        no neighbour waits on rounds that the newcomer would replay.
        """
        loop = asyncio.get_running_loop()
        while loop.time() < end and not all(self.engine.replicas[j].synced for j in running):
            await self._tick(0.25)
        synced = [j for j in sorted(running) if self.engine.replicas[j].synced]
        if self.resumed is None and synced:
            donor = synced[0]
            self.engine.x = {k: v.clone() for k, v in self.engine.replicas[donor].xhat.items()}
            if self.trainer is not None:
                self.trainer.load_adapter_state(self.engine.x)
            self.log.info("peer %d: late join, starting from neighbour %d's model", self.me, donor)
        target = min(running.values())
        if target > self.start_round:
            self.log.info("peer %d: catching up from round %d to the network's round %d", self.me, self.start_round, target)
            self.start_round = target
        self.engine.round = max(self.engine.round, self.start_round - 1)

    def _participants(self, rnd: int) -> set[int]:
        """Live neighbours that are not lagging by more than --max-lag rounds."""
        return {j for j in self.live if self.neighbor_round.get(j, 0) >= rnd - self.cfg.max_lag}

    def _model(self) -> dict[str, torch.Tensor]:
        """This peer's model: its cluster model with PPFM on, else the base engine's."""
        return self.levels.model() if self.levels is not None else self.engine.x

    def _sketch(self, rnd: int) -> None:
        if self.sketcher is not None:
            self.book.add(self.me, rnd, self.sketcher(self._model()))

    def _emit_records(self, force: bool = False) -> None:
        for srnd, rec in self.records.pop_ready(self.round, self.book.complete, force):
            est, got = self.book.estimate(srnd) if self.sketcher else (float("nan"), 0)
            rec["consensus_distance"] = est
            rec["consensus_peers"] = got
            labels = self.labels_at.pop(srnd, None)
            if labels is not None and self.sketcher is not None:
                have = {p: self.book.entries[(p, srnd)] for p in self.topo.ids if (p, srnd) in self.book.entries}
                rec["cluster_consensus_distance"], rec["global_consensus_distance"] = level_distances(have, labels, self.me)
            self.writer.write(rec)
            if self.prom is not None:
                self.prom.update(rec)
        self.book.prune(self.round - self.diameter - 4)
        self.fbook.prune(self.round - self.diameter - 4)

    async def run(self) -> int:
        self.log.info("peer %d: %d neighbours %s, %d rounds, compress=%s, run dir %s", self.me, len(self.neighbors), self.neighbors, self.cfg.rounds, self.cfg.compress, self.run_dir)
        await self.transport.start()
        tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._heartbeat_loop())]
        try:
            await self._startup()
            await self._rounds()
        finally:
            self._broadcast_control(self.engine.bye(), sorted(self.live))
            for j in self._extra_overlay():
                assert self.levels is not None
                self._send(j, self.levels.control(CLUSTER if j in self.levels.cluster_neighbors else GLOBAL, "bye"))
            await self.transport.drain(1.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._save()
            self._checkpoint()
            await self.transport.close()
            self.writer.close()
            if self.prom is not None:
                self.prom.close()
        return 0

    async def _rounds(self) -> None:
        before: dict[str, float] = {}
        if self.trainer is not None and self.start_round == 0:  # the zero-shot starting point
            before = {f"{k}_before": v for k, v in (await asyncio.to_thread(self.trainer.evaluate, True)).items()}
        drain = max(1, self.diameter if self.sketcher else 1)  # >= 1 so every training delta lands
        sent0, recv0 = self.transport.stats.bytes_sent, self.transport.stats.bytes_received
        for rnd in range(self.start_round, self.cfg.rounds + drain):
            if self._stop.is_set():
                self.log.info("peer %d: stopping after round %d", self.me, self.round)
                break
            t0 = time.time()
            if self.cfg.round_period > 0 and rnd > self.start_round:
                await asyncio.sleep(max(0.0, self._next_round_at - time.monotonic()))
            self._next_round_at = time.monotonic() + self.cfg.round_period
            training = rnd < self.cfg.rounds
            train_metrics: dict[str, float] = {}
            if training and self.levels is not None:
                await self._recluster(rnd)
            self._sketch(rnd)  # the model after rnd mixing steps
            if training and self.trainer is not None:
                if self.levels is None and self.trainer.cfg.augment != "off":  # synthesis teachers: neighbours' replicas
                    self.trainer.set_teachers([self.engine.replicas[j].xhat for j in sorted(self.live) if self.engine.replicas[j].synced])
                train_metrics = await asyncio.to_thread(self.trainer.train_round)
                self.engine.set_x(self.trainer.adapter_state())
            if training and self.attack is not None:
                self.engine.x = self.attack(self.engine.x, rnd)
            ppfm = training and self.levels is not None
            if ppfm:
                self._ppfm_send(rnd)
            delta = self.engine.make_delta(rnd, empty=not training or ppfm)
            self.round = rnd
            for j in sorted(self.live):
                self._send(j, self._with_sketches(delta, j))
            waited, late = await self._wait_round(rnd)
            if not training:
                self._emit_records()
                continue
            lagging = sorted(self.live - self._participants(rnd))
            if lagging:
                self.log.warning("peer %d: round %d leaves out lagging neighbours %s", self.me, rnd, lagging)
            mixing = self.engine
            if self.levels is not None:
                self.levels.mix(rnd, self._overlay_live(rnd))
                mixing = self.levels.cluster
                train_metrics.update(self._ppfm_metrics(rnd))
            else:
                self.engine.mix(self._participants(rnd))
            if self.trainer is not None:
                if self.levels is not None and self.levels.global_step(rnd):
                    train_metrics.update(await self._evaluate_global(rnd))
                self.trainer.load_adapter_state(self._model())
                train_metrics.update(await self._evaluate(rnd))
            stats = self.transport.stats
            rec: dict[str, Any] = {
                "peer": self.me,
                "round": rnd,
                "time": time.time(),
                "round_s": time.time() - t0,
                "wait_s": waited,
                "late_neighbors": late,
                "neighbor_distance": mixing.neighbor_distance(self.live if mixing is self.engine else self._overlay_live(rnd)),
                "bytes_sent": stats.bytes_sent - sent0,
                "bytes_received": stats.bytes_received - recv0,
                "payload_bytes": mixing.last_stats.payload_bytes,
                "compression_ratio": mixing.last_stats.dense_bytes / max(1, mixing.last_stats.payload_bytes),
                "compression_error": mixing.last_stats.compression_error,
                "live_neighbors": len(self.live),
                "rejected_messages": self.rejected,
                "duplicates": self.engine.duplicates + (self.levels.cluster.duplicates + self.levels.glob.duplicates if self.levels else 0),
                "dropped_messages": stats.dropped,
                **train_metrics,
                **(before if rnd == self.start_round else {}),
            }
            sent0, recv0 = stats.bytes_sent, stats.bytes_received
            self.records.push(rnd + 1, rec)
            self._emit_records()
            if self.cfg.checkpoint_every and (rnd + 1) % self.cfg.checkpoint_every == 0:
                self._save()
                self._checkpoint()
        self._emit_records(force=True)

    def _ppfm_send(self, rnd: int) -> None:
        """The task step is done: cluster delta to the cluster overlay, fingerprint into the flood,
        and on global rounds the representative's global delta to the other representatives."""
        assert self.levels is not None
        phi = self.trainer.adapter_state() if self.trainer is not None else self.levels.model()
        cmsg, fingerprint = self.levels.task_done(rnd, phi)
        self.fbook.add(self.me, rnd, fingerprint)
        live = self._overlay_live(rnd)
        for j in self.levels.cluster_neighbors:
            if j in live:
                self._send(j, cmsg)
        gmsg = self.levels.global_delta(rnd)
        for j in self.levels.global_neighbors if gmsg is not None else []:
            if j in live:
                self._send(j, gmsg)

    def _ppfm_metrics(self, rnd: int) -> dict[str, Any]:
        assert self.levels is not None
        lv = self.levels
        self.labels_at[rnd + 1] = dict(lv.labels)
        return {"cluster": lv.labels[self.me], "cluster_size": len(lv.members), "representative": lv.rep,
                "overlay_neighbors": sorted(lv.overlay_peers()), "clusters": len(set(lv.labels.values())),
                "cluster_labels": [lv.labels[p] for p in self.topo.ids]}

    async def _evaluate_global(self, rnd: int) -> dict[str, float]:
        """A representative's global meta model on this peer's test data, each global round."""
        assert self.levels is not None
        self.trainer.load_adapter_state(self.levels.glob.x)
        got = await asyncio.to_thread(self.trainer.evaluate, True)
        return {"global_model_accuracy": got["accuracy"], "global_model_global_accuracy": got["global_accuracy"]}

    async def _evaluate(self, rnd: int) -> dict[str, float]:
        every = max(1, int(self.trainer.cfg.eval_every))
        last = rnd == self.cfg.rounds - 1
        if rnd % every and not last:
            return {}
        return await asyncio.to_thread(self.trainer.evaluate, last or rnd % (every * 5) == 0)

    def _save(self) -> None:
        save_state(self.peer_dir / "adapter.safetensors", self._model(), {"round": str(self.round), "peer": str(self.me)})

    def _checkpoint(self) -> None:
        tensors, meta = ckpt.engine_state(self.engine)
        meta["peer"] = self.me
        if self.levels is not None:
            ltensors, meta["ppfm"] = ckpt.levels_state(self.levels)
            tensors.update(ltensors)
        meta["torch_rng"] = ckpt.split_plain(torch.get_rng_state(), "rng/torch", tensors)
        if self.trainer is not None and hasattr(self.trainer, "optimizer_state"):
            meta["optimizer"] = ckpt.split_plain(self.trainer.optimizer_state(), "opt", tensors)
        ckpt.save(self.peer_dir, max(self.round, 0), tensors, meta)

    def _resume(self) -> None:
        found = ckpt.load_latest(self.peer_dir)
        if found is None:
            self.log.warning("peer %d: --resume but no usable checkpoint in %s; starting fresh", self.me, self.peer_dir)
            return
        ckpt.restore_engine(self.engine, found.tensors, found.meta)
        if self.levels is not None and "ppfm" in found.meta:
            ckpt.restore_levels(self.levels, found.tensors, found.meta["ppfm"])
        torch.set_rng_state(ckpt.join_plain(found.meta["torch_rng"], found.tensors))
        if self.trainer is not None:
            self.trainer.load_adapter_state(self._model())
            if "optimizer" in found.meta:
                self.trainer.load_optimizer_state(ckpt.join_plain(found.meta["optimizer"], found.tensors))
        last_logged = -1
        if self.metrics_path.exists():
            last_logged = max((r["round"] for r in read_jsonl(self.metrics_path)), default=-1)
        self.start_round = max(self.engine.round + 1, last_logged + 1)
        self.engine.round = self.start_round - 1
        self.resumed = found
        self.log.info("peer %d: resumed from %s (round %d); next round %d", self.me, found.path.name, found.round, self.start_round)

    def request_stop(self) -> None:
        self._stop.set()


def parse_byzantine(spec: str) -> Any:
    """A model-poisoning fault for robustness experiments: the peer gossips a corrupted model.

    scale:F multiplies its model by F every round (an exploding sender); noise:S adds Gaussian
    noise of standard deviation S (a random sender)."""
    if spec in ("", "off", None):
        return None
    name, _, arg = spec.partition(":")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"--byzantine: expected scale:F or noise:S, got {spec!r}") from None
    if name == "scale":
        return lambda x, rnd: {k: v * value for k, v in x.items()}
    if name == "noise":
        def noisy(x: dict[str, torch.Tensor], rnd: int) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(rnd)
            return {k: v + value * torch.randn(v.shape, generator=g) for k, v in x.items()}
        return noisy
    raise ValueError(f"--byzantine: expected scale:F or noise:S, got {spec!r}")


def curve_keys(topo: topo_mod.Topology, me: int, cfg: PeerConfig) -> CurveKeys | None:
    """Secure mode is on exactly when the topology lists public keys; then every peer needs one."""
    listed = {p: spec.extra.get("public_key") for p, spec in topo.peers.items()}
    if not any(listed.values()):
        return None
    missing = sorted(p for p, k in listed.items() if not k)
    if missing:
        raise topo_mod.TopologyError(f"{cfg.topology}: peers {missing} have no public_key while others do; list one for every peer")
    for p, k in listed.items():
        if not isinstance(k, str) or len(k) != 40:
            raise topo_mod.TopologyError(f"{cfg.topology}: peer {p} public_key must be a 40-character Z85 string")
    path = cfg.secret_key or Path(cfg.topology).parent / "keys" / f"peer-{me}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise topo_mod.TopologyError(f"--secret-key: cannot load CurveZMQ secret key {path}: {e}") from e
    if secret is None:
        raise topo_mod.TopologyError(f"--secret-key: {path} holds no secret key")
    if public.decode() != listed[me]:
        raise topo_mod.TopologyError(f"--secret-key: {path} does not match peer {me}'s public_key in {cfg.topology}")
    return CurveKeys(public=public, secret=secret, peers={p: str(k).encode() for p, k in listed.items()})


def setup_logging(run_dir: Path, peer: int, level: str = "INFO") -> Path:
    path = run_dir / "logs" / f"peer-{peer}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s peer={peer} %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    for h in (logging.FileHandler(path), logging.StreamHandler()):
        h.setFormatter(fmt)
        root.addHandler(h)
    return path


def run_peer(cfg: PeerConfig) -> int:
    import signal

    import uvloop

    torch.set_num_threads(1)
    if cfg.keep_memory and not keep_message_memory():
        logging.getLogger("p2pfl").info("peer %d: no glibc mallopt here; allocator left as it is", cfg.id)
    random.seed(cfg.seed * 1000 + cfg.id)
    torch.manual_seed(cfg.seed * 1000 + cfg.id)
    try:
        peer = Peer(cfg)
    except (topo_mod.TopologyError, ValueError, OSError) as e:  # bad config, keys, checkpoint or data
        logging.getLogger("p2pfl").error("peer %d: cannot start: %s", cfg.id, e)
        return 2

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, peer.request_stop)
        return await peer.run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
