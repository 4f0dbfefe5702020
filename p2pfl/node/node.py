"""One peer's rounds as a sans-IO state machine (h11-style): events in, actions out.

The host (`p2pfl.host.daemon`) feeds events: frames that arrived (`receive`), the clock (`tick`, with
`now` in seconds of any monotonic clock), finished work (`trained`, `evaluated`) and `stop`. Each
returns the actions (`p2pfl.node.actions`) to carry out: messages to send, work to run (training and evaluation belong
to the host, which may share one model among many nodes), records to write, checkpoints to take.
`next_wakeup()` says when the clock must be fed again. Every protocol decision lives here, once:
liveness, the adaptive deadline, sketch flooding and validation, catch-up and late join, max-lag,
drain rounds, the PPFM levels and the evaluation schedule. Nothing here reads a clock or touches
a socket, so the daemon, the simulator and the benches run the same rounds.

On a time-varying schedule (`p2pfl.core.schedule`) a round's peers come from the schedule, not from a
neighbour list: `p2pfl.core.scheduled` says what goes to whom, there are no hellos or heartbeats (a peer
would need them to everyone), and a round-t sender that misses the deadline is left out of that
round and not waited for again until it is heard from. With `--algorithm gt` the engine's state
carries K-GT's tracking variable beside the model (`TRACK`), so it travels in the same messages
under the same codec, and the node keeps the correction the trainer applies in its local steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.core import topology as topo_mod
from p2pfl.core.abuse import Abuser, abuse_rate
from p2pfl.core.codec import CodecError
from p2pfl.core.compress import CompressionPlan
from p2pfl.core.conduct import Conduct, Limits, check_claim
from p2pfl.core.consensus import SketchBook, flatten, shared_sketcher
from p2pfl.core.estimate import EstimatorConfig, GossipEstimator
from p2pfl.core.gossip import ChocoEngine, GossipError, Refused, State, zeros_like_state
from p2pfl.core.robust import Attack, parse_byzantine
from p2pfl.core.scheduled import EdgeGossip, FullGossip, scheduled_gossip
from p2pfl.core.wire import BASE, CLUSTER, GLOBAL, Kind, Message, WireError, decode
from p2pfl.node import snapshot
from p2pfl.node.actions import Action, Checkpoint, Disconnect, Evaluate, Finish, Flush, Record, Send, Train
from p2pfl.node.piggyback import SKETCH_TENSOR, Piggyback
from p2pfl.node.records import RecordQueue
from p2pfl.ppfm.levels import Levels, PpfmConfig, level_distances, parse_clusters

HELLO_EVERY = 0.25  # seconds between start-up hellos to neighbours not seen yet
FLOOD_UP_TO = 32  # --estimator auto floods sketches up to this many peers, and gossip-averages beyond
PPFM_MAX_PEERS = 64  # PPFM floods every peer's fingerprint: O(n) per message, so bounded
TRACK = "_track/"  # gradient tracking: the engine-state names of the tracked model change (K-GT's z)
ALGORITHMS = ("dsgd", "gt")


def check_algorithm(cfg: PeerConfig, scheduled: bool) -> bool:
    """Whether this peer tracks gradients; refuses the combinations that have no meaning.

    Gradient tracking relies on the corrections summing to zero over the peers, which linear
    mixing keeps and robust rules do not; PPFM mixes other models than the one tracked. Schedules
    have a handful of peers a round, too few for robust rules, and no fixed neighbours for PPFM
    overlays or the gossip estimator."""
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"--algorithm: expected one of {', '.join(ALGORITHMS)}, got {cfg.algorithm!r}")
    tracking = cfg.algorithm == "gt"
    gt, sched = "docs/algorithms.md#gradient-tracking", "docs/algorithms.md#time-varying-schedules"
    refused = [(tracking and cfg.robust != "off", "--algorithm gt with --robust", gt),
               (tracking and cfg.clusters != "off", "--algorithm gt with --clusters", gt),
               (scheduled and cfg.robust != "off", "a schedule with --robust", sched),
               (scheduled and cfg.clusters != "off", "a schedule with --clusters", sched),
               (scheduled and cfg.estimator == "gossip", "a schedule with --estimator gossip (use flood)", sched)]
    for bad, what, doc in refused:
        if bad:
            raise ConfigError(f"{what}: not supported ({doc})")
    return tracking


def estimator_config(kind: str, topo: topo_mod.Topology, k: int, rounds: int) -> EstimatorConfig | None:
    """None for flooding (`consensus.SketchBook`), else the gossip estimator's settings. Its period
    is a divisor of `rounds` when one is close to the default, so the last round gets an estimate."""
    if kind not in ("auto", "flood", "gossip"):
        raise ConfigError(f"--estimator: expected auto, flood or gossip, got {kind!r}")
    if k <= 0 or kind == "flood" or (kind == "auto" and topo.n <= FLOOD_UP_TO):
        return None
    base = EstimatorConfig.for_topology(k, topo.mixing_lambda())
    every = max(d for d in range(1, base.every + 1) if rounds % d == 0) if rounds > 0 else base.every
    return EstimatorConfig(k=k, lag=base.lag, every=every if 2 * every >= base.every else base.every)


class Phase(Enum):
    STARTUP = "startup"
    CATCHUP = "catch-up"
    BEFORE = "zero-shot evaluation"
    ROUND = "round start"
    RECLUSTER = "waiting for fingerprints"
    TRAINING = "training"
    WAITING = "waiting for neighbours"
    EVAL_GLOBAL = "global-model evaluation"
    EVAL = "evaluation"
    DONE = "done"


class LogLimiter:
    """Log the first few of a kind of event, then every 1000th: hostile input must not flood the log."""

    def __init__(self, first: int = 20, every: int = 1000) -> None:
        self.first, self.every, self.count = first, every, 0

    def __call__(self) -> bool:
        self.count += 1
        return self.count <= self.first or self.count % self.every == 0


@dataclass
class NodeSpec:
    """What the host tells a node about itself beyond the config."""

    x0: State
    inc: int  # incarnation: grows across restarts (start time in microseconds)
    train: bool  # a trainer answers Train / Evaluate
    augment: bool = False  # the trainer synthesises with neighbours' replicas as teachers
    eval_every: int = 1
    secure: bool = False  # identities are CURVE keys (else routing ids / in-process senders)


class Node:
    def __init__(self, cfg: PeerConfig, topo: topo_mod.Topology, spec: NodeSpec, log: logging.Logger | None = None) -> None:
        if cfg.id not in topo.peers:
            raise topo_mod.TopologyError(f"--id: peer {cfg.id} is not in {cfg.topology} (ids {topo.ids})")
        self.cfg, self.topo, self.spec = cfg, topo, spec
        self.me = cfg.id
        self.neighbors = topo.neighbors(self.me)
        self.net = topo.network_id()  # stamped on every message sent, checked on every one received
        self.log = log or logging.getLogger(f"p2pfl.node.{self.me}")
        weights = topo.mh_weights(self.me)
        weights.pop(self.me)
        self.inc = spec.inc
        self.schedule = topo.schedule_for(cfg.seed) if topo.schedule is not None else None
        self.tracking = check_algorithm(cfg, self.schedule is not None)
        x0 = {**spec.x0, **{TRACK + k: torch.zeros_like(v) for k, v in spec.x0.items()}} if self.tracking else spec.x0
        self.correction: State = zeros_like_state(spec.x0) if self.tracking else {}  # K-GT's c_i, as a displacement per round
        self._sent_track: State = {}  # this round's tracked model change, as it went out (before mixing)
        try:
            plan = CompressionPlan.parse(cfg.compress)
        except CodecError as e:
            raise ConfigError(f"--compress {cfg.compress!r}: {e}") from None
        self.engine = ChocoEngine(self.me, weights, x0, plan, cfg.gamma, seed=cfg.seed, inc=self.inc,
                                  robust=cfg.robust, norm_factor=cfg.norm_factor, window=cfg.window)
        self.dyn: EdgeGossip | FullGossip | None = None
        if self.schedule is not None:  # the engine above only holds the model; this exchanges it
            try:
                self.dyn = scheduled_gossip(self.me, self.schedule, self.engine.x, self.engine.plan, cfg.gamma, cfg.seed, self.inc,
                                            cfg.norm_factor, cfg.window)
            except GossipError as e:
                raise ConfigError(str(e)) from None
        self.suspects: set[int] = set()  # schedule peers that missed a deadline: not waited for until heard from
        self._links: set[int] = set()
        self.attack: Attack | None = parse_byzantine(cfg.byzantine)
        rate = abuse_rate(cfg.byzantine)
        dim = flatten(spec.x0).numel()
        sketch_dim = cfg.sketch_dim
        if self.schedule is not None and cfg.estimator == "auto" and topo.n > FLOOD_UP_TO:
            sketch_dim = 0  # the gossip estimator averages with fixed weights; flooding is O(n) per message
        self.sketcher = shared_sketcher(dim, sketch_dim, cfg.seed) if sketch_dim > 0 else None
        self.abuser = None if rate is None else Abuser(self.me, self.engine.layout, rate, (SKETCH_TENSOR, max(1, cfg.sketch_dim)), self.inc)
        self.diameter = self.schedule.flood_rounds() if self.schedule is not None else topo.diameter()
        self.book = SketchBook(self.me, topo.ids, horizon=self.diameter + 2)
        self.est_cfg = None if self.schedule is not None else estimator_config(cfg.estimator, topo, cfg.sketch_dim, cfg.rounds)
        self.estimator = GossipEstimator(self.me, weights, self.est_cfg) if self.est_cfg is not None else None
        self.estimates: dict[int, float] = {}  # gossip estimator: sketch round -> estimate
        # PPFM: with clustering on, the base engine only paces rounds and floods sketches and
        # fingerprints (empty deltas); the model travels on the cluster and global channels.
        k = parse_clusters(cfg.clusters)
        self.levels: Levels | None = None
        if k is not None and topo.n > PPFM_MAX_PEERS:
            raise ConfigError(f"--clusters: PPFM floods every peer's fingerprint, so at most {PPFM_MAX_PEERS} peers; this topology has {topo.n}")
        if k is not None:
            pcfg = PpfmConfig(k=k, recluster_every=cfg.recluster_every, global_every=cfg.global_every, lam=cfg.global_lambda,
                              beta=cfg.cluster_beta, margin=cfg.cluster_margin, fingerprint_dim=cfg.fingerprint_dim, lag=self.diameter + 1)
            self.levels = Levels(self.me, topo, spec.x0, pcfg, plan, cfg.gamma, seed=cfg.seed, inc=self.inc)
            for eng, stride in ((self.levels.cluster, 1), (self.levels.glob, cfg.global_every)):  # the global level sends every K rounds
                eng.window, eng.round_window = cfg.window, cfg.window * stride
        self.fbook = SketchBook(self.me, topo.ids, horizon=self.diameter + 2)
        self.piggyback = Piggyback(self.me, self.book, self.sketcher.k if self.sketcher else -1, self.fbook,
                                   self.levels.cfg.fingerprint_dim if self.levels else None, self.estimator, self.diameter)
        self.overlay_seen: dict[int, float] = {}  # overlay peers that are not base neighbours
        self.overlay_down: set[int] = set()
        self.labels_at: dict[int, dict[int, int]] = {}  # sketch round -> clustering its record reports
        lag = self.est_cfg.lag if self.est_cfg is not None else self.diameter
        self.records = RecordQueue(give_up_after=lag + 2)
        self.last_seen: dict[int, float] = {}
        self.live: set[int] = set()
        self.heard: set[int] = set()  # neighbours (on a schedule: peers) that sent anything with a valid identity, accepted or not
        self.neighbor_round: dict[int, int] = {}
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}
        self._log_reject = LogLimiter()
        self.wait_ewma: float | None = None
        self.round = -1  # the last round whose delta went out
        self.start_round = 0
        self.resumed = False
        self.drain = max(1, lag + 1 if self.estimator else self.diameter if self.sketcher else 1)  # >= 1: every delta lands
        self.conduct = Conduct(Limits(claim_ahead=max(cfg.claim_ahead, 2 * cfg.max_lag), last_round=cfg.rounds + self.drain,
                                      strikes=cfg.strikes, cooloff=cfg.cooloff))
        self.internal_errors = 0
        self._log_internal: set[tuple[str, str]] = set()
        self.phase = Phase.STARTUP
        self.finished = False
        self._stop = False
        self._out: list[Action] = []
        self._wake = math.inf
        # per-round state
        self.rnd = 0
        self._t0 = self._wait_start = self._deadline_at = self._next_round_at = self._next_hello = 0.0
        self._next_beat = self._startup_end = self._recluster_end = self._train_asked = 0.0
        self._running: dict[int, int] = {}
        self._metrics: dict[str, Any] = {}
        self._payload: tuple[list[list[int]], torch.Tensor] | None = None  # this round's estimator payload
        self._phi: State = self.engine.x  # the trained model of this round, before any fault injection
        self._before: dict[str, Any] = {}
        self._waited, self._late = 0.0, []

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[Action]:
        if self.schedule is not None:
            self.log.info("peer %d: schedule %s (seed %d), algorithm %s, %d rounds, compress=%s, run dir %s", self.me, self.schedule.spec,
                          self.cfg.seed, self.cfg.algorithm, self.cfg.rounds, self.cfg.compress, self.cfg.run_dir)
        else:
            self.log.info("peer %d: %d neighbours %s, %d rounds, compress=%s, run dir %s", self.me, len(self.neighbors), self.neighbors,
                          self.cfg.rounds, self.cfg.compress, self.cfg.run_dir)
        self._startup_end = now + self.cfg.startup_timeout
        self._next_beat = now
        return self._advance(now)

    def tick(self, now: float) -> list[Action]:
        return self._advance(now)

    def stop(self) -> None:
        self._stop = True

    def fail(self, reason: str, now: float) -> list[Action]:
        """The host could not do this peer's work (its trainer raised): say goodbye and finish with 1."""
        self.log.error("peer %d: giving up in round %d: %s", self.me, self.rnd, reason)
        if not self.finished:
            self._finish(code=1)
        return self._advance(now)

    def trained(self, metrics: dict[str, Any], state: State, now: float) -> list[Action]:
        if self.phase is not Phase.TRAINING:
            raise RuntimeError(f"peer {self.me}: training result while {self.phase.value}")
        if self.tracking:  # the model's change over the local steps travels beside it: z_i (times K eta)
            state = {**state, **{TRACK + k: self.engine.x[k] - v for k, v in state.items()}}
        self.engine.set_x(state)
        if self.tracking:
            self._sent_track = {k: v.clone() for k, v in self.engine.x.items() if k.startswith(TRACK)}
        self._phi = self.engine.x
        self._metrics.update(metrics)
        if "train_s" in metrics:  # time waiting for the CPU (co-hosted peers train one after the other)
            self._metrics["train_queue_s"] = max(0.0, now - self._train_asked - float(metrics["train_s"]))
        self._send_round(now)
        return self._advance(now)

    def evaluated(self, metrics: dict[str, Any], now: float) -> list[Action]:
        if self.phase is Phase.BEFORE:
            self._before = {f"{k}_before": v for k, v in metrics.items()}
            self.phase = Phase.ROUND
        elif self.phase is Phase.EVAL_GLOBAL:
            self._metrics.update(global_model_accuracy=metrics["accuracy"], global_model_global_accuracy=metrics["global_accuracy"])
            self._evaluate_round(now)
        elif self.phase is Phase.EVAL:
            self._metrics.update(metrics)
            self._record(now)
        else:
            raise RuntimeError(f"peer {self.me}: evaluation result while {self.phase.value}")
        return self._advance(now)

    def receive(self, frames: list[Any], vouched: int | None, now: float) -> list[Action]:
        """Frames from the network; `vouched` is the sender the channel proves (CURVE key, routing
        id, or the co-hosted sender), None if it proves nothing."""
        try:
            # Values are checked where they are read: codecs refuse non-finite output before
            # anything reaches a replica, `piggyback` checks the float64 blocks.
            msg = decode(frames, self.cfg.max_frame, check_finite=False)
        except WireError as e:
            self._reject("wire", str(e))
            return self._flush()
        if vouched != msg.sender:
            what = f"CURVE key of peer {vouched}" if self.spec.secure else f"routing id {vouched}"
            self._reject("identity", f"{what} sent a message claiming to be peer {msg.sender}")
            return self._flush()
        if msg.net != self.net:  # not a strike: the sender's id is another network's
            self._reject("network", f"a message from peer {msg.sender} of network {msg.net:016x}; this peer's is {self.net:016x} "
                                    "(a stale run on a reused port, or a peer started with another topology file)")
            return self._flush()
        if msg.sender in self.engine.replicas or (self.dyn is not None and msg.sender in self.topo.peers and msg.sender != self.me):
            self.heard.add(msg.sender)
        try:
            if self.conduct.banned(msg.sender):
                self._reject("misbehaving", f"peer {msg.sender} is in its cool-off", strike=False)
            elif msg.channel != BASE:
                self._receive_level(msg, now)
            else:
                self._receive_base(msg, now)
        except Exception as e:  # a bug or an input no rule foresaw: one message is lost, not the peer
            self.internal_error(f"handling a {msg.kind.name} from peer {msg.sender}", e)
        return self._advance(now)

    def internal_error(self, where: str, e: BaseException) -> None:
        """Count an unexpected exception; its traceback is logged once per place and type."""
        self.internal_errors += 1
        key = (where.split(" from ")[0], type(e).__name__)
        if key not in self._log_internal:
            self._log_internal.add(key)
            self.log.error("peer %d: internal error %s: %s: %s [counted as internal_errors]", self.me, where, type(e).__name__, e,
                           exc_info=e)

    def next_wakeup(self) -> float:
        return self._wake

    # ------------------------------------------------------------------ messages

    def _reject(self, reason: str, detail: str, sender: int | None = None, now: float = 0.0, strike: bool = True) -> None:
        """Count a refusal by reason; from a known neighbour it is also a strike against it."""
        self.rejected += 1
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
        if self._log_reject():
            self.log.warning("peer %d: rejected message (%s): %s [total %d]", self.me, reason, detail, self.rejected)
        if strike and sender is not None and self.conduct.strike(sender, now):
            self.log.warning("peer %d: neighbour %d is misbehaving (%d refusals, the last: %s: %s); ignoring it for %.0fs, "
                             "its weight moves to self", self.me, sender, self.conduct.limits.strikes, reason, detail,
                             self.conduct.limits.cooloff)
            if sender in self.live:
                self.live.discard(sender)
                self._out.append(Flush(sender))

    def _readmit(self, now: float) -> None:
        """Neighbours whose cool-off is over are heard again, starting from a fresh full state."""
        for j in self.conduct.expired(now):
            self.log.info("peer %d: neighbour %d's cool-off is over; asking for its state", self.me, j)
            if self.dyn is not None:
                for dest, msg in self.dyn.forget(j):
                    self._send(dest, msg)
            elif j in self.engine.replicas:
                dest, msg = self.engine.forget(j)
                self._send(dest, msg)

    def _send(self, dest: int, msg: Message, now: float | None = None) -> None:
        if dest not in self.engine.replicas and now is not None:  # a PPFM overlay peer that is not a base neighbour
            self.overlay_seen.setdefault(dest, now)
        self._out.append(Send(dest, msg))

    def _ping(self, dest: int, msg: Message, down: bool) -> None:
        self._out.append(Send(dest, msg, offer=down))

    def _broadcast_control(self, msg: Message, to: list[int] | None = None) -> None:
        for j in self.neighbors if to is None else to:
            self._ping(j, msg, down=j not in self.live)

    def _receive_base(self, msg: Message, now: float) -> None:
        known = msg.sender in self.engine.replicas if self.dyn is None else msg.sender in self.topo.peers and msg.sender != self.me
        if not known:
            self._reject("unknown-peer", f"peer {msg.sender} is not a neighbour")
            return
        lie = check_claim(msg.sender, msg.round, self.round, self.neighbor_round, self.conduct.limits)
        if lie is not None:
            self._reject("round-claim", lie, msg.sender, now)
            return
        try:
            self._take_piggyback(msg)
            replies = self.engine.receive(msg) if self.dyn is None else self.dyn.receive(msg)
        except Refused as e:
            self._reject(e.reason, str(e), msg.sender, now)
            for dest, reply in e.replies:
                self._send(dest, reply)
            return
        except GossipError as e:
            self._reject("protocol", str(e), msg.sender, now)
            return
        if self.conduct.banned(msg.sender):
            return  # the sketches of this message were its last strike
        self.neighbor_round[msg.sender] = max(self.neighbor_round.get(msg.sender, 0), msg.round)
        if self.dyn is None:
            self._mark_seen(msg.sender, now, alive=msg.kind != Kind.BYE)
        elif msg.kind == Kind.BYE:
            self.suspects.add(msg.sender)
        else:
            self.suspects.discard(msg.sender)
        for dest, reply in replies:
            self._send(dest, reply)

    def _receive_level(self, msg: Message, now: float) -> None:
        """A PPFM cluster- or global-channel message: to that level's engine."""
        if self.levels is None:
            self._reject("channel", f"{msg.channel}-channel message from peer {msg.sender}, but clustering is off here")
            return
        try:
            replies = self.levels.receive(msg)
        except Refused as e:
            self._reject(e.reason, str(e), msg.sender, now)
            for dest, reply in e.replies:
                self._send(dest, reply, now)
            return
        except GossipError as e:
            self._reject("protocol", str(e), msg.sender, now)
            return
        if msg.kind == Kind.BYE:
            self.overlay_down.add(msg.sender)
        else:
            self.overlay_seen[msg.sender] = now
            self.overlay_down.discard(msg.sender)
        for dest, reply in replies:
            self._send(dest, reply, now)

    def _take_piggyback(self, msg: Message) -> None:
        """File the sketch, fingerprint and estimator blocks riding on `msg`; a malformed one
        raises `GossipError` (a strike), a stale or misdirected one is counted and dropped."""
        for take in (self.piggyback.take_estimate, self.piggyback.take_blocks):  # the first's drops count even if the second raises
            for reason, detail in take(msg, self.round):
                self._reject(reason, detail, strike=False)

    # ------------------------------------------------------------------ liveness

    def _mark_seen(self, peer: int, now: float, alive: bool = True) -> None:
        self.last_seen[peer] = now if alive else -math.inf
        if alive and peer not in self.live:
            self.live.add(peer)
            self.log.info("peer %d: neighbour %d is up", self.me, peer)
        elif not alive and peer in self.live:
            self.live.discard(peer)
            self._out.append(Flush(peer))
            self.log.info("peer %d: neighbour %d said goodbye", self.me, peer)

    def _extra_overlay(self) -> list[int]:
        """PPFM overlay peers that are not base-graph neighbours (no base heartbeats from them)."""
        return sorted(self.levels.overlay_peers() - set(self.neighbors)) if self.levels is not None else []

    def _overlay_control(self, j: int, make: str) -> Message:
        assert self.levels is not None
        return self.levels.control(CLUSTER if j in self.levels.cluster_neighbors else GLOBAL, make)

    def _heartbeat(self, now: float) -> None:
        if now < self._next_beat:
            return
        self._next_beat = now + self.cfg.heartbeat
        self._broadcast_control(self.engine.heartbeat())
        for j in sorted(self.live):
            if now - self.last_seen.get(j, -math.inf) > self.cfg.peer_timeout:
                self.live.discard(j)
                self._out.append(Flush(j))
                self.log.warning("peer %d: neighbour %d is down (silent for %.1fs); its weight moves to self", self.me, j, self.cfg.peer_timeout)
        for j in self._extra_overlay():
            self._ping(j, self._overlay_control(j, "heartbeat"), down=j in self.overlay_down)
            if j not in self.overlay_down and now - self.overlay_seen.get(j, now) > self.cfg.peer_timeout:
                self.overlay_down.add(j)
                self._out.append(Flush(j))
                self.log.warning("peer %d: overlay peer %d is down (silent for %.1fs)", self.me, j, self.cfg.peer_timeout)

    def _participants(self, rnd: int) -> set[int]:
        """Live neighbours that are not lagging by more than --max-lag rounds."""
        return {j for j in self.live if self.neighbor_round.get(j, 0) >= rnd - self.cfg.max_lag}

    def _overlay_live(self, rnd: int) -> set[int]:
        """Overlay peers to wait for and mix with: live base neighbours, and the others unless down."""
        return self._participants(rnd) | {j for j in self._extra_overlay() if j not in self.overlay_down}

    def _waiting_for(self, rnd: int) -> list[int]:
        if self.dyn is not None:
            return self.dyn.waiting_for(rnd, self.suspects | set(self.conduct.banned_until))
        late = self.engine.waiting_for(rnd, self._participants(rnd))
        if self.levels is not None and rnd < self.cfg.rounds:
            late += self.levels.waiting_for(rnd, self._overlay_live(rnd))
        return sorted(set(late))

    def _deadline(self) -> float:
        if self.wait_ewma is None:
            return self.cfg.round_timeout
        return min(self.cfg.round_timeout, max(self.cfg.min_wait, 4.0 * self.wait_ewma + 0.5))

    # ------------------------------------------------------------------ the state machine

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        for a in out:
            if isinstance(a, Send):
                a.msg.net = self.net
        return out

    def _advance(self, now: float) -> list[Action]:
        """Run phases until one has to wait for an event or the clock; set the next wake-up."""
        if not self.finished:
            self._readmit(now)
            self._heartbeat(now)
            self._wake = min(self._next_beat, self.conduct.next_expiry())
            if self.abuser is not None:
                self._abuse(now)
            while not self.finished and self._step(now):
                pass
        else:
            self._wake = math.inf
        return self._flush()

    def _abuse(self, now: float) -> None:
        """`--byzantine abuse`: this peer's hostile flood, offered (never queued) to every neighbour."""
        assert self.abuser is not None
        count = self.abuser.due(now)
        for j in self.neighbors if count else []:
            for msg in self.abuser.burst(count, self.rnd):
                self._out.append(Send(j, msg, offer=True))
        self._wake = min(self._wake, now + 0.02)

    def _until(self, t: float) -> bool:
        self._wake = min(self._wake, t)
        return False

    def _step(self, now: float) -> bool:
        """One transition if the current phase can make one now (True), else False."""
        p = self.phase
        if p is Phase.STARTUP:
            return self._startup(now)
        if p is Phase.CATCHUP:
            return self._catch_up(now)
        if p is Phase.BEFORE:
            return False
        if p is Phase.ROUND:
            return self._round_start(now)
        if p is Phase.RECLUSTER:
            return self._recluster(now)
        if p is Phase.WAITING:
            return self._wait(now)
        return False  # TRAINING, EVAL_GLOBAL, EVAL: an answer from the host moves on

    def _startup(self, now: float) -> bool:
        # A neighbour whose messages were refused is up all the same: waiting for it to behave
        # would let it hold this peer back while the others start.
        if set(self.neighbors) - self.live - self.heard and now < self._startup_end and not self._stop:
            if now >= self._next_hello:
                self._broadcast_control(self.engine.hello(), [j for j in self.neighbors if j not in self.live])
                self._next_hello = now + HELLO_EVERY
            return self._until(min(self._next_hello, self._startup_end))
        missing = sorted(set(self.neighbors) - self.live)
        if missing:
            self.log.warning("peer %d: starting without neighbours %s (not seen in %.0fs)", self.me, missing, self.cfg.startup_timeout)
        # One more hello so neighbours that saw us before we saw them have our latest state.
        self._broadcast_control(self.engine.hello())
        # Catch up only when every live neighbour is past round 0: one neighbour's claim alone
        # (a liar's, or a fault's) must not make a starting peer skip rounds the others still run.
        running = {j: r for j, r in self.neighbor_round.items() if j in self.live}
        self._running = running if running and min(running.values()) > 0 else {}
        self.phase = Phase.CATCHUP if self._running else Phase.ROUND
        if self.phase is Phase.ROUND:
            self._begin()
        return True

    def _catch_up(self, now: float) -> bool:
        """Join a network that is already running: resync replicas, then jump to its round.

        A peer without a checkpoint starts from a neighbour's current model (its exact xhat);
        a resumed peer keeps its own model. Both start at the slowest live neighbour's round, so
        no neighbour waits on rounds that the newcomer would replay."""
        running = self._running
        if now < self._startup_end and not all(self.engine.replicas[j].synced for j in running):
            return self._until(self._startup_end)
        synced = [j for j in sorted(running) if self.engine.replicas[j].synced]
        if not self.resumed and synced:
            donor = synced[0]
            self.engine.x = {k: v.clone() for k, v in self.engine.replicas[donor].xhat.items()}
            self.log.info("peer %d: late join, starting from neighbour %d's model", self.me, donor)
        target = min(running.values())
        if target > self.start_round:
            self.log.info("peer %d: catching up from round %d to the network's round %d", self.me, self.start_round, target)
            self.start_round = target
        self.engine.round = max(self.engine.round, self.start_round - 1)
        self._begin()
        return True

    def _begin(self) -> None:
        self.rnd = self.start_round
        if self.spec.train and self.start_round == 0:  # the zero-shot starting point
            self.phase = Phase.BEFORE
            self._out.append(Evaluate(-1, self.model(), True, "before"))
        else:
            self.phase = Phase.ROUND

    def _round_start(self, now: float) -> bool:
        rnd = self.rnd
        if self._stop or rnd >= self.cfg.rounds + self.drain:
            if self._stop:
                self.log.info("peer %d: stopping after round %d", self.me, self.round)
            self._finish()
            return False
        if self.cfg.round_period > 0 and rnd > self.start_round and now < self._next_round_at:
            return self._until(self._next_round_at)
        self._next_round_at = now + self.cfg.round_period
        self._t0 = now
        self._metrics = {}
        self.conduct.new_round()
        if rnd < self.cfg.rounds and self.levels is not None:
            self._recluster_end = now + self.cfg.min_wait
            self.phase = Phase.RECLUSTER
            return True
        self._train_or_send(now)
        return True

    def _recluster(self, now: float) -> bool:
        """Cluster the fingerprints of round rnd - lag, once every peer's has arrived.

        Flooding needs at most `diameter` rounds and the lag is one more, so the set is normally
        complete; if it is not (lost messages), this evaluation is skipped with a warning rather
        than clustered on a partial set that other peers would not share."""
        assert self.levels is not None
        rnd = self.rnd
        src = self.levels.fingerprint_round(rnd)
        if src is not None and not self.fbook.complete(src) and now < self._recluster_end:
            return self._until(self._recluster_end)
        if src is not None:
            self._apply_clustering(rnd, src, now)
        self._train_or_send(now)
        return True

    def _apply_clustering(self, rnd: int, src: int, now: float) -> None:
        assert self.levels is not None
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
                self._out.append(Disconnect(j))
                self.overlay_seen.pop(j, None)
                self.overlay_down.discard(j)
            for j in self._extra_overlay():
                self.overlay_seen.setdefault(j, now)

    def model(self) -> State:
        """This peer's model: its cluster model with PPFM on, else the base engine's."""
        if self.levels is not None:
            return self.levels.model()
        if self.tracking:
            return {k: v for k, v in self.engine.x.items() if not k.startswith(TRACK)}
        return self.engine.x

    def _train_or_send(self, now: float) -> None:
        rnd = self.rnd
        if self.sketcher is not None and self.estimator is not None:
            if self.estimator.starts(rnd):
                self.estimator.add_own(rnd, self.sketcher(self.model()))  # the model after rnd mixing steps
        elif self.sketcher is not None:
            self.book.add(self.me, rnd, self.sketcher(self.model()))
        if rnd < self.cfg.rounds and self.spec.train:
            teachers: list[State] = []
            if self.levels is None and self.spec.augment:  # synthesis teachers: live, synced neighbours' replicas
                teachers = [self.engine.replicas[j].xhat for j in sorted(self.live) if self.engine.replicas[j].synced]
            self.phase = Phase.TRAINING
            self._train_asked = now
            self._out.append(Train(rnd, self.model(), teachers, self.correction if self.tracking else None))
            return
        self._send_round(now)

    def _send_round(self, now: float) -> None:
        rnd = self.rnd
        training = rnd < self.cfg.rounds
        if training and self.attack is not None:
            honest = [self.engine.replicas[j].xhat for j in sorted(self.live) if self.engine.replicas[j].synced]
            self.engine.x = self.attack(self.engine.x, self.engine.xhat, rnd, honest)
        ppfm = training and self.levels is not None
        if ppfm:
            self._ppfm_send(rnd, now)
        if self.dyn is not None:
            self.engine.round = rnd
            out = self.dyn.outgoing(rnd, self.engine.x, empty=not training)
            self._relink(rnd)
        else:
            delta = self.engine.make_delta(rnd, empty=not training or ppfm)
            out = [(j, delta) for j in sorted(self.live)]
        self._payload = self.estimator.payload(rnd) if self.estimator is not None else None
        self.round = rnd
        for j, msg in out:
            self._send(j, self.piggyback.attach(msg, j, self.round, self._payload))
        self._send_owed(now)
        self._wait_start = now
        self._deadline_at = now + self._deadline()
        self.phase = Phase.WAITING

    def _relink(self, rnd: int) -> None:
        """Close the links to peers the schedule no longer sends to, a round after their last use
        (so what was queued for them leaves first)."""
        assert self.dyn is not None
        need = self.dyn.links(rnd) | self.dyn.links(rnd - 1)
        for j in sorted(self._links - need):
            self._out.append(Disconnect(j))
        self._links = need

    def _send_owed(self, now: float) -> None:
        """Full states that the one-per-round limit held back (a neighbour asked twice in a round)."""
        for dest, msg in self.engine.take_owed() if self.dyn is None else self.dyn.take_owed():
            self._send(dest, msg)
        if self.levels is not None:
            for eng, channel in ((self.levels.cluster, CLUSTER), (self.levels.glob, GLOBAL)):
                for dest, msg in eng.take_owed():
                    msg.channel = channel
                    self._send(dest, msg, now)

    def _ppfm_send(self, rnd: int, now: float) -> None:
        """The task step is done: cluster delta to the cluster overlay, fingerprint into the flood,
        and on global rounds the representative's global delta to the other representatives."""
        assert self.levels is not None
        phi = self._phi if self.spec.train else self.levels.model()
        cmsg, fingerprint = self.levels.task_done(rnd, phi)
        self.fbook.add(self.me, rnd, fingerprint)
        live = self._overlay_live(rnd)
        for j in self.levels.cluster_neighbors:
            if j in live:
                self._send(j, cmsg, now)
        gmsg = self.levels.global_delta(rnd)
        for j in self.levels.global_neighbors if gmsg is not None else []:
            if j in live:
                self._send(j, gmsg, now)

    def _wait_until(self) -> float:
        """The round's deadline; on a schedule, while some peer has never been heard from, at
        least the end of the start-up window: that peer may still be starting, and a peer waited
        for now may be waiting for it (a static topology waits for its neighbours before round 0
        instead, `_startup`)."""
        if self.dyn is not None and len(self.heard) < self.topo.n - 1:
            return max(self._deadline_at, self._startup_end)
        return self._deadline_at

    def _wait(self, now: float) -> bool:
        rnd = self.rnd
        late = self._waiting_for(rnd)
        until = self._wait_until()
        if late and now < until:
            return self._until(until)
        self._waited = now - self._wait_start
        if late:
            self.log.warning("peer %d: round %d deadline passed; mixing without %s", self.me, rnd, late)
            self.suspects.update(late if self.dyn is not None else ())
        else:
            self.wait_ewma = self._waited if self.wait_ewma is None else 0.8 * self.wait_ewma + 0.2 * self._waited
        self._late = late
        if self.estimator is not None:
            self.estimator.mix(rnd, self._participants(rnd))
            self.estimates.update(self.estimator.ready())
        self._mix(now)
        if self.dyn is not None:
            self.dyn.end_round(rnd)
        return True

    def _mix(self, now: float) -> None:
        rnd = self.rnd
        if rnd >= self.cfg.rounds:  # a drain round: only sketches travelled
            self._emit_records()
            self.rnd += 1
            self.phase = Phase.ROUND
            return
        lagging = sorted(self.live - self._participants(rnd))
        if lagging:
            self.log.warning("peer %d: round %d leaves out lagging neighbours %s", self.me, rnd, lagging)
        if self.levels is not None:
            self.levels.mix(rnd, self._overlay_live(rnd))
            self._metrics.update(self._ppfm_metrics(rnd))
        elif self.dyn is not None:
            self.dyn.mix(rnd, self.engine.x, set(self.conduct.banned_until))
        else:
            self.engine.mix(self._participants(rnd))
        if self.tracking and self.spec.train:
            self._track()
        if not self.spec.train:
            self._record(now)
        elif self.levels is not None and self.levels.global_step(rnd):  # a representative's global meta model
            self.phase = Phase.EVAL_GLOBAL
            self._out.append(Evaluate(rnd, self.levels.glob.x, True, "global-model"))
        else:
            self._evaluate_round(now)

    def _track(self) -> None:
        """K-GT's correction step, c_i += sum_j w_ij (z_j - z_i) (Liu, Lin, Koloskova, Stich, 2023),
        with c and z as displacements over a round. Mixing moved the tracking part from this
        peer's z_i by exactly that sum, so it is read off the engine: no second mixing rule.

        On push-sum (epidemic) the sum moves to numerators, c_i += omega_i' z_i' - omega_i z_i:
        column-stochastic mixing conserves sum_i omega_i z_i, so sum_i c_i stays 0, which is what
        puts the fixed point at the optimum of the sum. With omega = 1 the two rules agree."""
        before, after = (self.dyn.prior_weight, self.dyn.weight) if isinstance(self.dyn, FullGossip) else (1.0, 1.0)
        for k, c in self.correction.items():
            c += after * self.engine.x[TRACK + k] - before * self._sent_track[TRACK + k]

    def _evaluate_round(self, now: float) -> None:
        rnd = self.rnd
        every = max(1, int(self.spec.eval_every))
        last = rnd == self.cfg.rounds - 1
        if rnd % every and not last:
            self._record(now)
            return
        self.phase = Phase.EVAL
        self._out.append(Evaluate(rnd, self.model(), last or rnd % (every * 5) == 0, "round"))

    def _ppfm_metrics(self, rnd: int) -> dict[str, Any]:
        assert self.levels is not None
        lv = self.levels
        self.labels_at[rnd + 1] = dict(lv.labels)
        return {"cluster": lv.labels[self.me], "cluster_size": len(lv.members), "representative": lv.rep,
                "overlay_neighbors": sorted(lv.overlay_peers()), "clusters": len(set(lv.labels.values())),
                "cluster_labels": [lv.labels[p] for p in self.topo.ids], "cluster_evaluated_round": lv.state.evaluated_round,
                **{f"cluster_{k}": v for k, v in lv.state.scores.items()}}

    def _record(self, now: float) -> None:
        rnd = self.rnd
        mixing: ChocoEngine | EdgeGossip | FullGossip = self.engine if self.levels is None else self.levels.cluster
        mixing = self.dyn if self.dyn is not None else mixing
        rec: dict[str, Any] = {
            "peer": self.me,
            "round": rnd,
            "round_s": now - self._t0,
            "at": now,  # when the round ended, on the host's clock; the host turns it into wall time
            "wait_s": self._waited,
            "late_neighbors": self._late,
            "neighbor_distance": mixing.neighbor_distance(self.live if self.levels is None else self._overlay_live(rnd)),
            "model_norm": float(flatten(self.model()).double().norm()),  # the scale the report's relative consensus distance uses
            "payload_bytes": mixing.last_stats.payload_bytes,
            "compression_ratio": mixing.last_stats.dense_bytes / max(1, mixing.last_stats.payload_bytes),
            "compression_error": mixing.last_stats.compression_error,
            "live_neighbors": len(self.live) if self.dyn is None else len(self.dyn.mixed),
            "rejected_messages": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "misbehaving_marks": self.conduct.bans,
            "internal_errors": self.internal_errors,
            "duplicates": self.engine.duplicates + (self.levels.cluster.duplicates + self.levels.glob.duplicates if self.levels else 0)
            + (self.dyn.duplicates if self.dyn else 0),
            **self._metrics,
            **(self._before if rnd == self.start_round else {}),
        }
        self.records.push(rnd + 1, rec)
        self._emit_records()
        if self.cfg.checkpoint_every and (rnd + 1) % self.cfg.checkpoint_every == 0:
            self._out.append(Checkpoint(rnd))
        self.rnd += 1
        self.phase = Phase.ROUND

    def _emit_records(self, force: bool = False) -> None:
        complete = self.estimator.complete if self.estimator is not None else self.book.complete
        for srnd, rec in self.records.pop_ready(self.round, complete, force):
            if self.estimator is not None:  # an estimate on the estimator's rounds, null on the others
                rec["consensus_distance"] = self.estimates.pop(srnd, float("nan"))
                rec["consensus_lag"] = self.est_cfg.lag if self.est_cfg else 0
                self._out.append(Record(rec))
                continue
            est, got = self.book.estimate(srnd) if self.sketcher else (float("nan"), 0)
            rec["consensus_distance"] = est
            rec["consensus_peers"] = got
            labels = self.labels_at.pop(srnd, None)
            if labels is not None and self.sketcher is not None:
                have = {p: self.book.entries[(p, srnd)] for p in self.topo.ids if (p, srnd) in self.book.entries}
                rec["cluster_consensus_distance"], rec["global_consensus_distance"] = level_distances(have, labels, self.me)
            self._out.append(Record(rec))
        self.book.prune(self.round - self.diameter - 4)
        self.fbook.prune(self.round - self.diameter - 4)
        for r in [r for r in self.estimates if r < self.round - self.records.give_up_after - 4]:
            del self.estimates[r]

    def _finish(self, code: int = 0) -> None:
        self._emit_records(force=True)
        self._broadcast_control(self.engine.bye(), sorted(self.live))
        for j in self._extra_overlay():
            self._send(j, self._overlay_control(j, "bye"))
        self._out.append(Checkpoint(max(self.round, 0)))
        self._out.append(Finish(code))
        self.phase = Phase.DONE
        self.finished = True
        self._wake = math.inf

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = snapshot.engine_state(self.engine)
        tensors.update({f"track/{k}": v for k, v in self.correction.items()})
        meta["peer"] = self.me
        if self.levels is not None:
            ltensors, meta["ppfm"] = snapshot.levels_state(self.levels)
            tensors.update(ltensors)
        return tensors, meta

    def resume(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], last_logged: int) -> None:
        """Continue from a checkpoint: engine (and levels) state; the next round follows both the
        checkpoint and the last round already in the metrics file."""
        snapshot.restore_engine(self.engine, tensors, meta)
        for k, c in self.correction.items():
            if f"track/{k}" not in tensors:
                raise snapshot.CheckpointError(f"checkpoint: no gradient-tracking correction for {k!r} (saved without --algorithm gt?)")
            c.copy_(tensors[f"track/{k}"])
        if self.levels is not None and "ppfm" in meta:
            snapshot.restore_levels(self.levels, tensors, meta["ppfm"])
        self.start_round = max(self.engine.round + 1, last_logged + 1)
        self.engine.round = self.start_round - 1
        self.resumed = True
