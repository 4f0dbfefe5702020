"""`--byzantine abuse[:RATE]`: a peer that keeps its keys and floods its neighbours with messages
that are valid on the wire and hostile in their protocol fields (experiments only).

Each burst, to every neighbour: resync requests and hellos of ever newer incarnations (each asks
for a full state: a few bytes in, a model out), deltas with sequence numbers and rounds far
ahead (each a full dense model to buffer), heartbeats claiming absurd rounds (to drive catch-up
and --max-lag), and sketch rows of far-future rounds (never pruned). The peer otherwise runs its
rounds as usual, so its neighbours cannot simply find it silent. What a neighbour must do about
it is in `p2pfl.core.conduct` and `ChocoEngine`'s window and rate limit; `tests/test_insider.py` and
`bench/attacks.py` measure it.
"""

from __future__ import annotations

import math

import torch

from p2pfl.core.robust import ByzantineSpec
from p2pfl.core.wire import Kind, Message, TensorPayload

FAR = 2**62
DEFAULT_RATE = 200.0  # hostile messages per second to each neighbour


def abuse_rate(spec: str | None) -> float | None:
    """The flood rate of an `abuse[:RATE]` spec (checked by `robust.ByzantineSpec`), or None for another one."""
    s = ByzantineSpec.parse(spec)
    if s.name != "abuse":
        return None
    return DEFAULT_RATE if s.value is None else s.value


class Abuser:
    """Makes the hostile messages; the node sends them on its own clock (`due`)."""

    def __init__(self, me: int, layout: dict[str, tuple[int, ...]], rate: float, sketches: tuple[str, int], inc: int) -> None:
        """`sketches`: the name of the flooded sketch tensor and its row length."""
        self.me, self.rate = me, rate
        self.sketch_tensor, self.sketch_k = sketches
        self.inc = inc
        self.n = 0
        self.dense = {k: TensorPayload(codec="none", shape=s, parts={"data": torch.ones(math.prod(s))}) for k, s in layout.items()}
        self._last: float | None = None

    def due(self, now: float) -> int:
        """How many messages per neighbour are due since the last call (at most a tenth of a
        second's worth: after a long training step the flood resumes, it does not catch up)."""
        if self._last is None:
            self._last = now
            return 0
        k = int((now - self._last) * self.rate)
        if k:
            self._last = max(self._last + k / self.rate, now - 0.1)
        return min(k, max(1, int(self.rate / 10)))

    def burst(self, count: int, rnd: int) -> list[Message]:
        out = []
        for _ in range(count):
            self.n += 1
            kind = self.n % 5
            if kind == 0:
                out.append(Message(Kind.RESYNC, self.me, round=max(rnd, 0), seq=0, inc=self.inc))
            elif kind == 1:
                self.inc += 1  # a "restart": its first message asks for our full state
                out.append(Message(Kind.HELLO, self.me, round=max(rnd, 0), seq=1, inc=self.inc))
            elif kind == 2:
                out.append(Message(Kind.DELTA, self.me, round=max(rnd, 0) + 1 + self.n % 7, seq=FAR - self.n, inc=self.inc,
                                   tensors=dict(self.dense)))
            elif kind == 3:
                out.append(Message(Kind.HEARTBEAT, self.me, round=FAR, seq=0, inc=self.inc))
            else:
                rows = torch.ones((4, self.sketch_k), dtype=torch.float64)
                out.append(Message(Kind.HEARTBEAT, self.me, round=max(rnd, 0), seq=0, inc=self.inc,
                                   tensors={self.sketch_tensor: TensorPayload("none", tuple(rows.shape), {"data": rows})},
                                   info={"sketches": [[self.me, FAR - i] for i in range(4)]}))
        return out
