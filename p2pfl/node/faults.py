"""`--byzantine`: a peer that misbehaves on purpose, for experiments (docs/attacks.md). An honest
peer has no attack and no flood, and these calls do nothing."""

from __future__ import annotations

import math

from p2pfl.core.abuse import Abuser
from p2pfl.node.actions import Action, Send
from p2pfl.node.mixer import Attack, Mixer

FLOOD_TICK = 0.02  # seconds between an abusing peer's bursts


class Faults:
    def __init__(self, attack: Attack | None, abuser: Abuser | None) -> None:
        self.attack, self.abuser = attack, abuser

    def tamper(self, mixer: Mixer, rnd: int, live: set[int]) -> None:
        """A model attack on this round's model, before it is sent."""
        if self.attack is not None:
            mixer.tamper(self.attack, rnd, live)

    def flood(self, now: float, rnd: int, neighbours: list[int]) -> tuple[list[Action], float]:
        """`abuse`: the hostile messages due now, offered (never queued) to every neighbour, and
        when the next burst is due."""
        if self.abuser is None:
            return [], math.inf
        count = self.abuser.due(now)
        out: list[Action] = []
        for j in neighbours if count else []:
            out += [Send(j, msg, offer=True) for msg in self.abuser.burst(count, rnd)]
        return out, now + FLOOD_TICK
