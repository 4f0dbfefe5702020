"""One peer's rounds as a sans-IO state machine (h11-style): events in, actions out.

The host (`p2pfl.host.daemon`) feeds events: frames that arrived (`receive`), the clock (`tick`,
with `now` in seconds of any monotonic clock), finished work (`trained`, `evaluated`) and `stop`.
Each returns the actions (`p2pfl.node.actions`) to carry out: messages to send, work to run
(training and evaluation belong to the host, which may share one model among many nodes),
records to write, checkpoints to take. `next_wakeup()` says when the clock must be fed again.
Nothing here reads a clock or touches a socket, so the daemon, the simulator and the benches run
the same rounds.

The phases are written once. What differs between kinds of network is behind the node's parts
(`build.make_node` picks them): a `Neighbourhood` says who the peers of a round are and whether
they are alive, a `Mixer` what travels, what a message does and how the round mixes; the
`Monitor` keeps the consensus estimate and holds records until it is known, `Intake` judges what
comes in, the algorithm (`tracking`) says what travels beside the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from p2pfl.config import PeerConfig
from p2pfl.core.gossip import Action as Reply
from p2pfl.core.gossip import GossipError, Refused
from p2pfl.core.state import State
from p2pfl.core.wire import BASE, Message
from p2pfl.node.actions import Action, Checkpoint, Disconnect, Evaluate, Finish, Flush, Record, Send, Train
from p2pfl.node.faults import Faults
from p2pfl.node.intake import Intake
from p2pfl.node.mixer import Mixer
from p2pfl.node.neighbourhood import Neighbourhood
from p2pfl.node.records import Monitor, round_record
from p2pfl.node.tracking import Dsgd

HELLO_EVERY = 0.25  # seconds between start-up hellos to neighbours not seen yet


class Phase(Enum):
    STARTUP = "startup"
    CATCHUP = "catch-up"
    BEFORE = "zero-shot evaluation"
    ROUND = "round start"
    PREPARE = "preparing the round"
    TRAINING = "training"
    WAITING = "waiting for neighbours"
    EVAL_GLOBAL = "global-model evaluation"
    EVAL = "evaluation"
    DONE = "done"


WORKING = (Phase.BEFORE, Phase.TRAINING, Phase.EVAL_GLOBAL, Phase.EVAL)  # a Train or Evaluate action is out


@dataclass
class NodeSpec:
    """What the host tells a node about itself beyond the config."""

    x0: State
    inc: int  # incarnation: grows across restarts (start time in microseconds)
    train: bool  # a trainer answers Train / Evaluate
    augment: bool = False  # the trainer synthesises with neighbours' replicas as teachers
    eval_every: int = 1
    secure: bool = False  # identities are CURVE keys (else routing ids / in-process senders)


@dataclass
class Parts:
    nbh: Neighbourhood
    mixer: Mixer
    monitor: Monitor
    algo: Dsgd
    faults: Faults
    intake: Intake


class Node:
    def __init__(self, cfg: PeerConfig, spec: NodeSpec, parts: Parts, log: logging.Logger) -> None:
        self.cfg, self.spec, self.log = cfg, spec, log
        self.me = cfg.id
        self.nbh, self.mixer, self.monitor = parts.nbh, parts.mixer, parts.monitor
        self.algo, self.faults, self.intake = parts.algo, parts.faults, parts.intake
        self.drain = self.monitor.drain
        self.wait_ewma: float | None = None
        self.round = -1  # the last round whose delta went out
        self.start_round = 0
        self.resumed = False
        self.phase = Phase.STARTUP
        self.finished = False
        self._stop = False
        self._out: list[Action] = []
        self._wake = math.inf
        # per-round state
        self.rnd = 0
        self._t0 = self._wait_start = self._deadline_at = self._next_round_at = self._next_hello = 0.0
        self._next_beat = self._startup_end = self._prepare_end = self._train_asked = 0.0
        self._running: dict[int, int] = {}
        self._metrics: dict[str, Any] = {}
        self._before: dict[str, Any] = {}
        self._waited, self._late = 0.0, []

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[Action]:
        self.log.info(self.nbh.describe())
        self._startup_end = now + self.cfg.startup_timeout
        self._next_beat = now
        return self._advance(now)

    def tick(self, now: float) -> list[Action]:
        return self._advance(now)

    def stop(self) -> None:
        self._stop = True

    def fail(self, reason: str, now: float) -> list[Action]:
        """The host could not do this peer's work (its trainer raised, its process is going down):
        say goodbye and finish with 1. With work still out, no checkpoint: the trainer may be in
        the middle of a step, and the last periodic checkpoint is a consistent one."""
        self.log.error("peer %d: giving up in round %d: %s", self.me, self.rnd, reason)
        if not self.finished:
            self._finish(code=1, checkpoint=self.phase not in WORKING)
        return self._advance(now)

    def trained(self, metrics: dict[str, Any], state: State, now: float) -> list[Action]:
        if self.phase is Phase.DONE:
            return []  # the answer to work that was out when this peer failed
        if self.phase is not Phase.TRAINING:
            raise RuntimeError(f"peer {self.me}: training result while {self.phase.value}")
        self.mixer.set_trained(self.algo.trained(state, self.mixer.model()))
        self.algo.sent(self.mixer.model())
        self._metrics.update(metrics)
        if "train_s" in metrics:  # time waiting for the CPU (co-hosted peers train one after the other)
            self._metrics["train_queue_s"] = max(0.0, now - self._train_asked - float(metrics["train_s"]))
        self._send_round(now)
        return self._advance(now)

    def evaluated(self, metrics: dict[str, Any], now: float) -> list[Action]:
        if self.phase is Phase.DONE:
            return []
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
        msg = self.intake.decode(frames, vouched)
        if msg is None:
            return self._flush()
        if self.nbh.knows(msg.sender):
            self.nbh.heard.add(msg.sender)
        try:
            if self.intake.banned(msg.sender):
                self._reject("misbehaving", f"peer {msg.sender} is in its cool-off", strike=False)
            else:
                self._receive(msg, now)
        except Exception as e:  # a bug or an input no rule foresaw: one message is lost, not the peer
            self.intake.internal_error(f"handling a {msg.kind.name} from peer {msg.sender}", e)
        return self._advance(now)

    def next_wakeup(self) -> float:
        return self._wake

    def model(self) -> State:
        """This peer's model (with PPFM on, its cluster model)."""
        return self.algo.model(self.mixer.model())

    # ------------------------------------------------------------------ messages

    def _receive(self, msg: Message, now: float) -> None:
        try:
            own = self.nbh.handle(msg, now)  # the neighbourhood's own protocol (open membership's views)
        except Refused as e:
            self._reject(e.reason, str(e), msg.sender, now)
            return
        if own is not None:
            self._out += own
            return
        refusal = self.nbh.refuse(msg)
        if refusal is not None:
            self._reject(*refusal)
            return
        base = msg.channel == BASE  # the graph's channel: rounds, the flooded blocks, liveness
        if base:
            lie = self.intake.lie(msg, self.round, self.nbh.claims())
            if lie is not None:
                self._reject("round-claim", lie, msg.sender, now)
                return
        if base:  # what rides on the message is judged apart from the model update it rides on
            dropped, refused = self.monitor.take(msg, self.round)
            for reason, detail in dropped:
                self._reject(reason, detail, strike=False)
            for detail in refused:
                self._reject("block", detail, msg.sender, now)
        try:
            replies = self.mixer.receive(msg)
        except Refused as e:
            self._reject(e.reason, str(e), msg.sender, now)
            self._send_all(e.replies, now)
            return
        except GossipError as e:
            self._reject("protocol", str(e), msg.sender, now)
            return
        if base:
            if self.intake.banned(msg.sender):
                return  # the blocks of this message were its last strike
            self.nbh.claimed(msg.sender, msg.round)
        self._out += self.nbh.accepted(msg, now)
        self._send_all(replies, now)

    def _reject(self, reason: str, detail: str, sender: int | None = None, now: float = 0.0, strike: bool = True) -> None:
        """Count a refusal; a neighbour that it marks misbehaving is left out (its weight moves to self)."""
        if self.intake.reject(reason, detail, sender, now, strike) and sender is not None and self.nbh.exclude(sender):
            self._out.append(Flush(sender))

    def _readmit(self, now: float) -> None:
        """Neighbours whose cool-off is over are heard again, starting from a fresh full state."""
        for j in self.intake.conduct.expired(now):
            self.log.info("peer %d: neighbour %d's cool-off is over; asking for its state", self.me, j)
            self._send_all(self.mixer.forget(j), now)

    def _send(self, dest: int, msg: Message, now: float) -> None:
        self.nbh.contacted(dest, now)
        self._out.append(Send(dest, msg))

    def _send_all(self, replies: list[Reply], now: float) -> None:
        for dest, msg in replies:
            self._send(dest, msg, now)

    def _broadcast(self, msg: Message, to: list[int]) -> None:
        """A control message, offered (now or never) to the peers that are down."""
        live = self.nbh.live
        self._out += [Send(j, msg, offer=j not in live) for j in to]

    def _heartbeat(self, now: float) -> None:
        if now < self._next_beat:
            return
        self._next_beat = now + self.cfg.heartbeat
        self._out += self.nbh.beat(now, self.mixer.control("heartbeat"))

    # ------------------------------------------------------------------ the state machine

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        for a in out:
            if isinstance(a, Send):
                a.msg.net = self.intake.net
        return out

    def _advance(self, now: float) -> list[Action]:
        """Run phases until one has to wait for an event or the clock; set the next wake-up."""
        if not self.finished:
            self._readmit(now)
            self._heartbeat(now)
            flood, flood_at = self.faults.flood(now, self.rnd, self.nbh.neighbours)
            self._out += flood
            self._wake = min(self._next_beat, self.intake.conduct.next_expiry(), flood_at)
            while not self.finished and self._step(now):
                pass
        else:
            self._wake = math.inf
        return self._flush()

    def _until(self, t: float) -> bool:
        self._wake = min(self._wake, t)
        return False

    def _step(self, now: float) -> bool:
        """One transition if the current phase can make one now (True), else False."""
        step = {Phase.STARTUP: self._startup, Phase.CATCHUP: self._catch_up, Phase.ROUND: self._round_start,
                Phase.PREPARE: self._prepare, Phase.WAITING: self._wait}.get(self.phase)
        return step(now) if step is not None else False  # the other phases wait for an answer from the host

    def _startup(self, now: float) -> bool:
        nbrs, live = self.nbh.neighbours, self.nbh.live
        # A neighbour whose messages were refused is up all the same: waiting for it to behave
        # would let it hold this peer back while the others start.
        if (set(nbrs) - live - self.nbh.heard or not self.nbh.ready()) and now < self._startup_end and not self._stop:
            if now >= self._next_hello:
                self._broadcast(self.mixer.control("hello"), [j for j in nbrs if j not in live])
                self._next_hello = now + HELLO_EVERY
            return self._until(min(self._next_hello, self._startup_end))
        missing = sorted(set(nbrs) - live)
        if missing:
            waited = now - self._startup_end + self.cfg.startup_timeout  # less than the timeout when the others are up (open networks)
            self.log.warning("peer %d: starting without neighbours %s (not heard from in %.1fs)", self.me, missing, waited)
        # One more hello so neighbours that saw us before we saw them have our latest state.
        self._broadcast(self.mixer.control("hello"), nbrs)
        self._running = self.nbh.running()
        self.phase = Phase.CATCHUP if self._running else Phase.ROUND
        if self.phase is Phase.ROUND:
            self._begin()
        return True

    def _catch_up(self, now: float) -> bool:
        """Join a network that is already running: resync replicas, then jump to its round.

        A peer without a checkpoint starts from a neighbour's current model (its exact xhat);
        a resumed peer keeps its own model. Both start at the slowest live neighbour's round, so
        no neighbour waits on rounds that the newcomer would replay."""
        live = self.nbh.live  # neighbours gone since start-up are not waited for (an open network's view turns over)
        running = {j: r for j, r in self._running.items() if j in live} or {j: r for j, r in self.nbh.rounds.items() if j in live}
        if now < self._startup_end and not (running and all(self.mixer.synced(j) for j in running)):
            return self._until(self._startup_end)
        running = running or self._running
        synced = [j for j in sorted(running) if self.mixer.synced(j)]
        if not self.resumed and synced:
            self.mixer.adopt(synced[0])
            self.log.info("peer %d: late join, starting from neighbour %d's model", self.me, synced[0])
        target = min(running.values())
        if target > self.start_round:
            self.log.info("peer %d: catching up from round %d to the network's round %d", self.me, self.start_round, target)
            self.start_round = target
        self.mixer.round = max(self.mixer.round, self.start_round - 1)
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
        self.intake.conduct.new_round()
        if rnd < self.cfg.rounds:
            self._prepare_end = now + self.cfg.min_wait
            self.phase = Phase.PREPARE
            return True
        self._train_or_send(now)
        return True

    def _prepare(self, now: float) -> bool:
        """Wait up to --min-wait for what the round starts from (PPFM: the fingerprints to cluster)."""
        if not self.mixer.prepared(self.rnd) and now < self._prepare_end:
            return self._until(self._prepare_end)
        self._out += [Disconnect(j) for j in self.mixer.prepare(self.rnd, now, self.nbh)]
        self._train_or_send(now)
        return True

    def _train_or_send(self, now: float) -> None:
        rnd = self.rnd
        self.monitor.sketch(rnd, self.model())  # the model after rnd mixing steps
        if rnd < self.cfg.rounds and self.spec.train:
            teachers = self.mixer.teachers(self.nbh.live) if self.spec.augment else []
            self.phase = Phase.TRAINING
            self._train_asked = now
            self._out.append(Train(rnd, self.model(), teachers, self.algo.correction))
            return
        self._send_round(now)

    def _send_round(self, now: float) -> None:
        rnd = self.rnd
        training = rnd < self.cfg.rounds
        if training:
            self.faults.tamper(self.mixer, rnd, self.nbh.live)
        sends = self.mixer.outgoing(rnd, training, self.nbh)
        self._out += [Disconnect(j) for j in self.mixer.released(rnd)]
        self.monitor.start_sending(rnd)
        self.round = rnd
        for j, msg in sends:
            self._send(j, self.monitor.attach(msg, j, rnd) if msg.channel == BASE else msg, now)
        self._send_all(self.mixer.owed(), now)
        self._wait_start = now
        self._deadline_at = now + self._deadline()
        self.phase = Phase.WAITING

    def _deadline(self) -> float:
        if self.wait_ewma is None:
            return self.cfg.round_timeout
        return min(self.cfg.round_timeout, max(self.cfg.min_wait, 4.0 * self.wait_ewma + 0.5))

    def _wait(self, now: float) -> bool:
        rnd = self.rnd
        late = self.mixer.waiting_for(rnd, rnd < self.cfg.rounds, self.nbh, set(self.intake.conduct.banned_until))
        until = self.nbh.wait_until(self._deadline_at, self._startup_end)
        if late and now < until:
            return self._until(until)
        self._waited = now - self._wait_start
        if late:
            self.log.warning("peer %d: round %d deadline passed; mixing without %s", self.me, rnd, late)
            self.nbh.missed(late)
        else:
            self.wait_ewma = self._waited if self.wait_ewma is None else 0.8 * self.wait_ewma + 0.2 * self._waited
        self._late = late
        self.monitor.mix(rnd, self.nbh.participants(rnd))
        self._mix(now)
        self.mixer.end_round(rnd)
        return True

    def _mix(self, now: float) -> None:
        rnd = self.rnd
        if rnd >= self.cfg.rounds:  # a drain round: only sketches travelled
            self._emit_records()
            self.rnd += 1
            self.phase = Phase.ROUND
            return
        lagging = sorted(self.nbh.live - self.nbh.participants(rnd))
        if lagging:
            self.log.warning("peer %d: round %d leaves out lagging neighbours %s", self.me, rnd, lagging)
        self._metrics.update(self.mixer.mix(rnd, self.nbh, set(self.intake.conduct.banned_until)))
        if self.spec.train:
            self.algo.mixed(self.mixer.model(), self.mixer.push_sum_weights())
        glob = self.mixer.global_model(rnd)
        if not self.spec.train:
            self._record(now)
        elif glob is not None:
            self.phase = Phase.EVAL_GLOBAL
            self._out.append(Evaluate(rnd, glob, True, "global-model"))
        else:
            self._evaluate_round(now)

    def _evaluate_round(self, now: float) -> None:
        rnd = self.rnd
        every = max(1, int(self.spec.eval_every))
        last = rnd == self.cfg.rounds - 1
        if rnd % every and not last:
            self._record(now)
            return
        self.phase = Phase.EVAL
        self._out.append(Evaluate(rnd, self.model(), last or rnd % (every * 5) == 0, "round"))

    def _record(self, now: float) -> None:
        rnd = self.rnd
        rec = round_record(self.me, rnd, now, now - self._t0, self._waited, self._late, self.model(), self.mixer.stats(rnd, self.nbh),
                           self.intake)
        rec.update(self._metrics, **(self._before if rnd == self.start_round else {}))
        self.monitor.push(rnd, rec)
        self._emit_records()
        if self.cfg.checkpoint_every and (rnd + 1) % self.cfg.checkpoint_every == 0:
            self._out.append(Checkpoint(rnd))
        self.rnd += 1
        self.phase = Phase.ROUND

    def _emit_records(self, force: bool = False) -> None:
        self._out += [Record(rec) for rec in self.monitor.ready(self.round, force)]

    def _finish(self, code: int = 0, checkpoint: bool = True) -> None:
        self._emit_records(force=True)
        self._broadcast(self.mixer.control("bye"), sorted(self.nbh.live))
        self._out += self.nbh.farewells()
        if checkpoint:
            self._out.append(Checkpoint(max(self.round, 0)))
        self._out.append(Finish(code))
        self.phase = Phase.DONE
        self.finished = True
        self._wake = math.inf

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The mixer's engines and what the algorithm keeps beside the model."""
        tensors, meta = self.mixer.snapshot()
        tensors.update(self.algo.snapshot())
        meta["peer"] = self.me
        return tensors, meta

    def resume(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], last_logged: int) -> None:
        """Continue from a checkpoint; the next round follows both the checkpoint and the last
        round already in the metrics file."""
        self.mixer.restore(tensors, meta)
        self.algo.restore(tensors)
        self.start_round = max(self.mixer.round + 1, last_logged + 1)
        self.mixer.round = self.start_round - 1
        self.resumed = True
