"""Neighbourhoods: whom a peer talks to in round t, with which weights, and who of them is alive.

- `StaticGraph`: a topology file's edges. Neighbours greet each other at start, beat every
  `--heartbeat`, and a silent or departed one is down (its weight moves to self: the mixer leaves
  it out) until it speaks again.
- `Scheduled`: a time-varying schedule. Round t's peers come from the schedule, so there are no
  fixed neighbours, hellos or heartbeats; a peer that missed a deadline is a suspect, not waited
  for again until it is heard from.
- `p2pfl.node.ppfm.Overlay`: a static graph plus the PPFM overlay peers that are not neighbours.

The weights themselves live with the mixer's engines (Metropolis-Hastings rows, or the schedule's
matrices); a neighbourhood says whom they apply to this round.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod

from p2pfl.config import PeerConfig
from p2pfl.core.gossip import Refused
from p2pfl.core.schedule import Schedule
from p2pfl.core.topology import Topology
from p2pfl.core.wire import BASE, Kind, Message
from p2pfl.node.actions import Action, Flush, Send
from p2pfl.node.liveness import Liveness


class Neighbourhood(ABC):
    neighbours: list[int]  # fixed contacts: hellos at start, heartbeats, goodbyes (none on a schedule)

    def __init__(self, me: int, known: set[int], cfg: PeerConfig, log: logging.Logger) -> None:
        """`known`: the peers whose base-channel messages are expected at all."""
        self.me, self.cfg, self.log = me, cfg, log
        self._known = known
        self.rounds: dict[int, int] = {}  # the latest round each peer claimed in an accepted base-channel message
        self.heard: set[int] = set()  # peers that sent anything with a valid identity, accepted or not
        self.sent_at: dict[int, float] = {}  # when a message last went to each peer

    @property
    @abstractmethod
    def live(self) -> set[int]:
        """Neighbours up now (on a schedule: none; its peers are judged per round)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the start of the log."""

    def knows(self, peer: int) -> bool:
        return peer in self._known

    def ready(self) -> bool:
        """Whether the first round may start (besides every neighbour heard from, or the start-up timeout)."""
        return True

    def claims(self) -> dict[int, int]:
        """The neighbours' rounds a new claim is judged against (`core.conduct.check_claim`)."""
        return self.rounds

    def running(self) -> dict[int, int]:
        """The live neighbours' rounds a starting peer catches up to: only once every one is past
        round 0, so that one claim alone (a liar's, or a fault's) cannot make it skip rounds the
        others still run."""
        running = {j: r for j, r in self.rounds.items() if j in self.live}
        return running if running and min(running.values()) > 0 else {}

    def handle(self, msg: Message, now: float) -> list[Action] | None:
        """The actions of a message the neighbourhood answers itself (open membership's VIEW),
        None for the others; `Refused` names the rule that refuses one. A fixed graph has no views."""
        if msg.kind == Kind.VIEW:
            raise Refused("view-unexpected", f"view message from peer {msg.sender}, but this network's topology is fixed")
        return None

    def refuse(self, msg: Message) -> tuple[str, str] | None:
        """(reason, detail) if `msg` has no business here, before anything is read from it."""
        if msg.channel != BASE:
            return "channel", f"{msg.channel}-channel message from peer {msg.sender}, but clustering is off here"
        if not self.knows(msg.sender):
            return "unknown-peer", f"peer {msg.sender} is not a neighbour"
        return None

    def claimed(self, peer: int, rnd: int) -> None:
        self.rounds[peer] = max(self.rounds.get(peer, 0), rnd)

    @abstractmethod
    def accepted(self, msg: Message, now: float) -> list[Action]:
        """What an accepted message says of its sender's liveness."""

    def contacted(self, peer: int, now: float) -> None:
        """A message is going to `peer`: it needs no heartbeat in this heartbeat period."""
        self.sent_at[peer] = now

    def participants(self, rnd: int) -> set[int]:
        """Live neighbours that are not lagging by more than --max-lag rounds: waited for and mixed with."""
        return {j for j in self.live if self.rounds.get(j, 0) >= rnd - self.cfg.max_lag}

    def beat(self, now: float, heartbeat: Message) -> list[Action]:
        """Heartbeats to the neighbours that got nothing else in the last period (while that keeps
        each one's silence under half --peer-timeout); those silent too long go down (their queues
        are flushed)."""
        quiet = min(self.cfg.heartbeat, self.cfg.peer_timeout / 2 - self.cfg.heartbeat)
        out: list[Action] = [Send(j, heartbeat, offer=j not in self.live) for j in self.neighbours
                             if now - self.sent_at.get(j, -math.inf) >= quiet]
        return out + [Flush(j) for j in self._expire(now)]

    def _expire(self, now: float) -> list[int]:
        return []

    def farewells(self) -> list[Action]:
        """Goodbyes at the end to peers besides the live neighbours (they get the base channel's)."""
        return []

    def exclude(self, peer: int) -> bool:
        """`peer` misbehaves and is ignored for a while; True if its queue must be flushed."""
        return False

    def missed(self, late: list[int]) -> None:
        """The round's deadline passed without these."""
        return None

    def wait_until(self, deadline: float, startup_end: float) -> float:
        """When waiting for a round's messages ends."""
        return deadline


class StaticGraph(Neighbourhood):
    def __init__(self, me: int, topo: Topology, cfg: PeerConfig, log: logging.Logger) -> None:
        super().__init__(me, set(topo.neighbors(me)), cfg, log)
        self.neighbours = topo.neighbors(me)
        self.liveness = Liveness(me, self.neighbours, cfg.peer_timeout, log)

    @property
    def live(self) -> set[int]:
        return self.liveness.live

    def describe(self) -> str:
        c = self.cfg
        return (f"peer {self.me}: {len(self.neighbours)} neighbours {self.neighbours}, {c.rounds} rounds, compress={c.compress}, "
                f"run dir {c.run_dir}")

    def accepted(self, msg: Message, now: float) -> list[Action]:
        return [Flush(msg.sender)] if self.liveness.seen(msg.sender, now, alive=msg.kind != Kind.BYE) else []

    def _expire(self, now: float) -> list[int]:
        return self.liveness.expire(now)

    def exclude(self, peer: int) -> bool:
        return self.liveness.drop(peer)


class Scheduled(Neighbourhood):
    def __init__(self, me: int, topo: Topology, schedule: Schedule, cfg: PeerConfig, log: logging.Logger) -> None:
        super().__init__(me, set(topo.peers) - {me}, cfg, log)
        self.neighbours = []
        self.schedule, self.n = schedule, topo.n
        self.suspects: set[int] = set()  # peers that missed a deadline: not waited for until heard from

    @property
    def live(self) -> set[int]:
        return set()

    def describe(self) -> str:
        c = self.cfg
        return (f"peer {self.me}: schedule {self.schedule.spec} (seed {c.seed}), algorithm {c.algorithm}, {c.rounds} rounds, "
                f"compress={c.compress}, run dir {c.run_dir}")

    def accepted(self, msg: Message, now: float) -> list[Action]:
        if msg.kind == Kind.BYE:
            self.suspects.add(msg.sender)
        else:
            self.suspects.discard(msg.sender)
        return []

    def missed(self, late: list[int]) -> None:
        self.suspects.update(late)

    def wait_until(self, deadline: float, startup_end: float) -> float:
        """While some peer has never been heard from, at least the end of the start-up window: that
        peer may still be starting, and a peer waited for now may be waiting for it (a static graph
        waits for its neighbours before round 0 instead)."""
        return max(deadline, startup_end) if len(self.heard) < self.n - 1 else deadline
