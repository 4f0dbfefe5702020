"""Which round's record can be written yet.

A round's consensus estimate needs every peer's sketch of the model after that round, which
reaches a peer up to `diameter` rounds later; records therefore wait in `RecordQueue` until
their sketch set is complete (or is given up on) and are written in round order.
"""

from __future__ import annotations

from typing import Any


class RecordQueue:
    """Holds each round's record until the consensus estimate of its sketch round is known."""

    def __init__(self, give_up_after: int) -> None:
        self.give_up_after = give_up_after
        self.waiting: list[tuple[int, dict[str, Any]]] = []  # (sketch round, record)

    def push(self, sketch_round: int, record: dict[str, Any]) -> None:
        self.waiting.append((sketch_round, record))

    def pop_ready(self, current_round: int, is_complete: Any, force: bool = False) -> list[tuple[int, dict[str, Any]]]:
        """Records, in order, whose sketch round is complete or too old to wait for."""
        out = []
        while self.waiting:
            r, _rec = self.waiting[0]
            if not (force or is_complete(r) or current_round - r > self.give_up_after):
                break
            out.append(self.waiting.pop(0))
        return out
