"""How a peer judges its neighbours' conduct: strikes for refused messages, a cool-off for one that
keeps earning them, and a sanity check on the rounds they claim.

Keys keep strangers out; this is for a neighbour that holds valid keys and still misbehaves
(compromised, buggy or malicious). Each refusal from it is a strike. Strikes halve at every round
of ours, so an honest neighbour's rare refusals (a replay after a restart, a lost message) fade,
while a flood crosses the threshold within a round. A neighbour over the threshold is ignored for
a cool-off period: its messages are dropped and its weight moves to self, as for a down peer.
Pure: time is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    claim_ahead: int  # a claimed round may lead this peer and its other neighbours by this many rounds
    last_round: int  # no honest peer of this run claims a later round (rounds plus drain rounds)
    strikes: int  # strikes that mark a neighbour misbehaving
    cooloff: float  # seconds a misbehaving neighbour is ignored


def check_claim(sender: int, claim: int, own: int, others: Mapping[int, int], limits: Limits) -> str | None:
    """Why a round claim is not believable, or None.

    A claim beyond the run's last round is never honest. A claim far ahead of this peer's round
    and every other neighbour's is a lie or a fault, not the network's round: believed, it would
    drive catch-up and --max-lag. With no other neighbour to compare (a path's end, a peer that
    just restarted), only the run's bound applies, so a lone honest neighbour ahead of a
    restarted peer is still followed."""
    if claim > limits.last_round:
        return f"peer {sender} claims round {claim}, past this run's last round {limits.last_round}"
    rivals = [r for j, r in others.items() if j != sender]
    if rivals:
        ref = max(own, *rivals)
        if claim > ref + limits.claim_ahead:
            return f"peer {sender} claims round {claim}, {claim - ref} ahead of this peer and its other neighbours (at most {limits.claim_ahead})"
    return None


class Conduct:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.strikes: dict[int, float] = {}
        self.banned_until: dict[int, float] = {}
        self.bans = 0  # how many times a neighbour was marked misbehaving

    def strike(self, peer: int, now: float) -> bool:
        """Count one refusal; True when it marks the neighbour misbehaving (from now on, for the cool-off)."""
        if peer in self.banned_until:
            return False
        self.strikes[peer] = self.strikes.get(peer, 0.0) + 1.0
        if self.strikes[peer] < self.limits.strikes:
            return False
        self.banned_until[peer] = now + self.limits.cooloff
        self.strikes[peer] = 0.0
        self.bans += 1
        return True

    def banned(self, peer: int) -> bool:
        return peer in self.banned_until

    def new_round(self) -> None:
        for j in self.strikes:
            self.strikes[j] /= 2

    def expired(self, now: float) -> list[int]:
        """Neighbours whose cool-off is over: they are heard again (from a fresh state)."""
        done = sorted(j for j, t in self.banned_until.items() if now >= t)
        for j in done:
            del self.banned_until[j]
        return done

    def next_expiry(self) -> float:
        return min(self.banned_until.values(), default=float("inf"))
