"""Mixers: what a peer sends in a round, what a received model message does, whom it still waits
for, how it mixes, and what it owes. The node's phases call these and never ask which one it has.

- `ChocoMixer`: CHOCO-Gossip with a replica of every neighbour on a static graph (`core.gossip`).
- `ScheduledMixer`: a time-varying schedule, per-edge CHOCO or whole models (`core.scheduled`).
- `p2pfl.node.ppfm.LevelsMixer`: PPFM's cluster and global levels beside a pacing base engine.

Each keeps its model in a base `ChocoEngine` (`engine`): the schedule's exchanges and the PPFM
levels use it for the model, its controls (hello, heartbeat, goodbye) and checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from p2pfl.core.gossip import Action, ChocoEngine
from p2pfl.core.scheduled import EdgeGossip, FullGossip
from p2pfl.core.state import State
from p2pfl.core.wire import Message
from p2pfl.node import snapshot
from p2pfl.node.neighbourhood import Neighbourhood, Scheduled

Attack = Callable[[State, State, int, list[State]], State]


class Mixer(ABC):
    """The interface, over the base channel's CHOCO engine; what every kind does alike is here."""

    def __init__(self, engine: ChocoEngine) -> None:
        self.engine = engine
        self._phi: State = engine.x  # this round's trained model, before any fault injection

    # ------------------------------------------------------------------ the model

    def model(self) -> State:
        return self.engine.x

    def set_trained(self, state: State) -> None:
        self.engine.set_x(state)
        self._phi = self.engine.x

    def tamper(self, attack: Attack, rnd: int, live: set[int]) -> None:
        """`--byzantine`: this round's model, as the attack makes it from the honest neighbours' replicas."""
        honest = [self.engine.replicas[j].xhat for j in sorted(live) if self.engine.replicas[j].synced]
        self.engine.x = attack(self.engine.x, self.engine.xhat, rnd, honest)

    def teachers(self, live: set[int]) -> list[State]:
        """Neighbours' models for zero-shot augmentation: live, synced replicas."""
        return [self.engine.replicas[j].xhat for j in sorted(live) if self.engine.replicas[j].synced]

    def control(self, kind: str) -> Message:
        """The base channel's hello, heartbeat or goodbye."""
        return {"hello": self.engine.hello, "heartbeat": self.engine.heartbeat, "bye": self.engine.bye}[kind]()

    # ------------------------------------------------------------------ catch-up (static graphs)

    def synced(self, peer: int) -> bool:
        return self.engine.replicas[peer].synced

    def adopt(self, donor: int) -> None:
        """Start from a neighbour's exact public copy (a late joiner without a checkpoint)."""
        self.engine.x = {k: v.clone() for k, v in self.engine.replicas[donor].xhat.items()}

    @property
    def round(self) -> int:
        return self.engine.round

    @round.setter
    def round(self, rnd: int) -> None:
        self.engine.round = rnd

    # ------------------------------------------------------------------ a round

    def prepared(self, rnd: int) -> bool:
        """Whether what the round starts from is in (PPFM: the flooded fingerprints)."""
        return True

    def prepare(self, rnd: int, now: float, nbh: Neighbourhood) -> list[int]:
        """Set up round `rnd`; the peers no longer needed (their links close)."""
        return []

    @abstractmethod
    def outgoing(self, rnd: int, training: bool, nbh: Neighbourhood) -> list[Action]:
        """This round's messages, (destination, message); `training` is False in drain rounds."""

    def released(self, rnd: int) -> list[int]:
        """Peers whose links this round no longer needs."""
        return []

    @abstractmethod
    def receive(self, msg: Message) -> list[Action]:
        """Feed a validated model-channel message; the replies. Raises `Refused` or `GossipError`."""

    @abstractmethod
    def waiting_for(self, rnd: int, training: bool, nbh: Neighbourhood, banned: set[int]) -> list[int]:
        """Peers whose round-`rnd` message has not been applied yet, and that are still waited for."""

    @abstractmethod
    def mix(self, rnd: int, nbh: Neighbourhood, banned: set[int]) -> dict[str, Any]:
        """Mix round `rnd`; what the round's record should also show."""

    def end_round(self, rnd: int) -> None:
        """The round is mixed: what was kept for it can go."""
        return None

    def owed(self) -> list[Action]:
        """Full states the one-per-round limit held back (a neighbour asked twice in a round), and
        requests for states that have not come (`ChocoEngine.overdue`)."""
        return self.engine.take_owed() + self.engine.overdue()

    def forget(self, peer: int) -> list[Action]:
        """Drop what is kept of `peer` (its cool-off is over) and ask for its state."""
        return [self.engine.forget(peer)] if peer in self.engine.replicas else []

    def global_model(self, rnd: int) -> State | None:
        """A model to evaluate on the shared test set after mixing round `rnd` (PPFM's global model)."""
        return None

    def push_sum_weights(self) -> tuple[float, float]:
        """(before, after) the last mix of this peer's push-sum weight; 1 where mixing is doubly stochastic."""
        return 1.0, 1.0

    @abstractmethod
    def stats(self, rnd: int, nbh: Neighbourhood) -> dict[str, Any]:
        """The mixing figures of a round's record."""

    @staticmethod
    def _stats(mixing: ChocoEngine | EdgeGossip | FullGossip, live: set[int], count: int, duplicates: int) -> dict[str, Any]:
        s = mixing.last_stats
        return {"neighbor_distance": mixing.neighbor_distance(live), "payload_bytes": s.payload_bytes,
                "compression_ratio": s.dense_bytes / max(1, s.payload_bytes), "compression_error": s.compression_error,
                "live_neighbors": count, "duplicates": duplicates}

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return snapshot.engine_state(self.engine)

    def restore(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        snapshot.restore_engine(self.engine, tensors, meta)


class ChocoMixer(Mixer):
    """CHOCO on a static graph: the base engine itself, a replica of every neighbour."""

    def outgoing(self, rnd: int, training: bool, nbh: Neighbourhood) -> list[Action]:
        delta = self.engine.make_delta(rnd, empty=not training)
        return [(j, delta) for j in sorted(nbh.live)]

    def receive(self, msg: Message) -> list[Action]:
        return self.engine.receive(msg)

    def waiting_for(self, rnd: int, training: bool, nbh: Neighbourhood, banned: set[int]) -> list[int]:
        return sorted(set(self.engine.waiting_for(rnd, nbh.participants(rnd))))

    def mix(self, rnd: int, nbh: Neighbourhood, banned: set[int]) -> dict[str, Any]:
        self.engine.mix(nbh.participants(rnd))
        return {}

    def end_round(self, rnd: int) -> None:
        """Late deltas that came during the round (a drain round's wait included) are owed now."""
        self.engine.settle()

    def stats(self, rnd: int, nbh: Neighbourhood) -> dict[str, Any]:
        e = self.engine
        return {**self._stats(e, nbh.live, len(nbh.live), e.duplicates), "late_settled": e.settled, "gaps_asked": e.gaps,
                "states_applied": e.states}


class ScheduledMixer(Mixer):
    """Gossip on a time-varying schedule: round t's exchange comes from `core.scheduled`; the base
    engine only holds the model (its graph has no edges)."""

    def __init__(self, engine: ChocoEngine, exchange: EdgeGossip | FullGossip) -> None:
        super().__init__(engine)
        self.exchange = exchange
        self._links: set[int] = set()

    def outgoing(self, rnd: int, training: bool, nbh: Neighbourhood) -> list[Action]:
        self.engine.round = rnd
        return self.exchange.outgoing(rnd, self.engine.x, empty=not training)

    def released(self, rnd: int) -> list[int]:
        """Links to peers the schedule no longer sends to close a round after their last use (what
        was queued for them leaves first)."""
        need = self.exchange.links(rnd) | self.exchange.links(rnd - 1)
        gone = sorted(self._links - need)
        self._links = need
        return gone

    def receive(self, msg: Message) -> list[Action]:
        return self.exchange.receive(msg)

    def waiting_for(self, rnd: int, training: bool, nbh: Neighbourhood, banned: set[int]) -> list[int]:
        assert isinstance(nbh, Scheduled)
        return self.exchange.waiting_for(rnd, nbh.suspects | banned)

    def mix(self, rnd: int, nbh: Neighbourhood, banned: set[int]) -> dict[str, Any]:
        self.exchange.mix(rnd, self.engine.x, banned)
        return {}

    def end_round(self, rnd: int) -> None:
        self.exchange.end_round(rnd)

    def owed(self) -> list[Action]:
        return self.exchange.take_owed()

    def forget(self, peer: int) -> list[Action]:
        return self.exchange.forget(peer)

    def push_sum_weights(self) -> tuple[float, float]:
        if isinstance(self.exchange, FullGossip):
            return self.exchange.prior_weight, self.exchange.weight
        return 1.0, 1.0

    def stats(self, rnd: int, nbh: Neighbourhood) -> dict[str, Any]:
        x = self.exchange
        return self._stats(x, set(), len(x.mixed), self.engine.duplicates + x.duplicates)
