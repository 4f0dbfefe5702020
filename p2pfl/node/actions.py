"""What a node (`p2pfl.node.node`) asks its host to do: the actions of its sans-IO state machine.

The host carries them out (`p2pfl.host.daemon` over sockets and a shared model, `p2pfl.sim.simulation` in process)
and answers `Train` and `Evaluate` through the node's `trained` and `evaluated` events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pfl.core.gossip import State
from p2pfl.core.wire import Message


@dataclass
class Send:
    dest: int
    msg: Message
    offer: bool = False  # now or never: a periodic ping to a peer that is down must not queue


@dataclass
class Flush:
    """Drop what waits to be sent to a peer that went down."""

    peer: int


@dataclass
class Disconnect:
    """A PPFM overlay peer, or a peer of a schedule's past rounds, that is no longer needed."""

    peer: int


@dataclass
class Train:
    """Load `start` into this peer's adapter, run one round of local steps, answer `trained`.
    `correction` (gradient tracking): the local steps also move the adapter by -correction over
    the round, in equal parts per step."""

    round: int
    start: State
    teachers: list[State] = field(default_factory=list)
    correction: State | None = None


@dataclass
class Evaluate:
    """Evaluate `state` on this peer's data, answer `evaluated`."""

    round: int
    state: State
    global_eval: bool
    purpose: str  # "before" (zero-shot start), "global-model" (PPFM), "round"


@dataclass
class Record:
    """One round's metrics record; the host adds wall time and its byte counters."""

    record: dict[str, Any]


@dataclass
class Checkpoint:
    """Save the model and a checkpoint (`Node.checkpoint_state` plus the host's trainer state)."""

    round: int


@dataclass
class Finish:
    code: int = 0


Action = Send | Flush | Disconnect | Train | Evaluate | Record | Checkpoint | Finish
