"""What a base-channel message carries beside the model: flooded consensus-sketch rows, flooded
PPFM fingerprints and the gossip estimator's payload.

These blocks ride on the messages the round sends anyway, so they cost no extra message; they are
also the part of a message a hostile neighbour can make largest, so every block is checked in
full (keys, shape, dtype, finiteness, round range) before a row reaches a book. A block is
refused on its own: the model update it rode on is judged by the engine alone. Pure, like
`p2pfl.node.node`, which owns one `Piggyback` and turns what it refuses into counted rejections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pfl.core.consensus import SketchBook
from p2pfl.core.estimate import WINDOW, EstimatorError, GossipEstimator
from p2pfl.core.wire import Kind, Message, TensorPayload, all_finite

SKETCH_TENSOR = "_sketches"
FINGERPRINT_TENSOR = "_fingerprints"  # PPFM update fingerprints, flooded like the sketches
ESTIMATE_TENSOR = "_estimate"  # the gossip estimator's in-flight instances (p2pfl.core.estimate)


@dataclass
class Block:
    """One flooded block: its tensor name, its info key, the book its rows go to, the row length."""

    tensor: str
    key: str
    book: SketchBook
    k: int


class Piggyback:
    """The blocks of one peer. Sketch rows are flooded unless the gossip estimator replaces them;
    fingerprints are flooded with PPFM on (`fingerprint_dim` given)."""

    def __init__(self, me: int, book: SketchBook, sketch_k: int, fbook: SketchBook, fingerprint_dim: int | None,
                 estimator: GossipEstimator | None, diameter: int) -> None:
        self.me, self.estimator, self.diameter = me, estimator, diameter
        self.blocks = [] if estimator is not None else [Block(SKETCH_TENSOR, "sketches", book, sketch_k)]
        if fingerprint_dim is not None:
            self.blocks.append(Block(FINGERPRINT_TENSOR, "fingerprints", fbook, fingerprint_dim))

    def take_blocks(self, msg: Message, round_: int) -> tuple[list[tuple[str, str]], list[str]]:
        """File the flooded blocks of `msg` (taking every block out of it, so the model part is left
        as the sender's engine made it) at this peer's last round `round_`. Returns (dropped,
        refused): the (reason, detail) of what was dropped without blaming the sender, and why each
        malformed block was refused, a strike against the sender. A refused block loses only
        itself: the model update it rode on still applies.

        Rows go into the books except this peer's own (only it makes those; a copy that comes back
        is redundant, and one that comes first would be a forgery), rows too old to matter, and
        rows of rounds no honest flood can have reached yet (they would never be pruned)."""
        dropped: list[tuple[str, str]] = []
        refused: list[str] = []
        stray = msg.tensors.pop(FINGERPRINT_TENSOR, None) if not any(b.tensor == FINGERPRINT_TENSOR for b in self.blocks) else None
        if stray is not None:
            refused.append(f"fingerprints from peer {msg.sender}: clustering is off here")
        lo = round_ - self.diameter - 4
        hi = max(round_, msg.round) + self.diameter + 2
        for b, tp in [(b, msg.tensors.pop(b.tensor, None)) for b in self.blocks]:
            if tp is None:
                continue
            keys = msg.info.get(b.key)
            data = tp.parts.get("data")
            if (
                not isinstance(keys, list)
                or data is None
                or data.dtype != torch.float64
                or tuple(data.shape) != (len(keys), b.k)
                or not all(isinstance(e, list) and len(e) == 2 and all(isinstance(v, int) for v in e) for e in keys)
            ):
                refused.append(f"{b.key} from peer {msg.sender}: malformed block (keys/shape/dtype; rows of {b.k} float64 expected)")
                continue
            if not all_finite(data):
                refused.append(f"{b.key} from peer {msg.sender}: contains NaN or Inf")
                continue
            future = 0
            for (origin, rnd), row in zip(keys, data, strict=True):
                if rnd > hi:
                    future += 1
                elif origin != self.me and rnd >= lo:
                    b.book.add(origin, rnd, row.clone(), via=msg.sender)
            if future:  # an honest neighbour may relay rows that a liar gave it
                dropped.append(("sketch-round", f"{b.key} from peer {msg.sender}: {future} rows of rounds after {hi}"))
        return dropped, refused

    def take_estimate(self, msg: Message, round_: int) -> list[tuple[str, str]]:
        """Feed the gossip estimator's payload of `msg` (taking it out); a bad one is dropped, as
        (reason, detail), without losing the delta it rode on."""
        tp = msg.tensors.pop(ESTIMATE_TENSOR, None)
        if tp is None:
            return []
        if self.estimator is None:
            return [("estimate", f"estimator payload from peer {msg.sender}, but this peer floods sketches (--estimator)")]
        if msg.kind != Kind.DELTA or abs(msg.round - max(round_, 0)) > WINDOW:
            return []  # a neighbour too far ahead or behind: its estimate instances are not this peer's
        try:
            self.estimator.receive(msg.sender, msg.round, msg.info.get("estimate"), tp.parts.get("data"))
        except EstimatorError as e:
            return [("estimate", f"from peer {msg.sender}: {e}")]
        return []

    def attach(self, msg: Message, peer: int, round_: int, payload: tuple[list[list[int]], torch.Tensor] | None) -> Message:
        """`msg` for `peer` with the rows it has not had yet, and on a delta this round's
        estimator `payload` (if it has rows)."""
        tensors, info = dict(msg.tensors), dict(msg.info)
        for b in self.blocks:
            out = b.book.outgoing(peer, max(round_, 0))
            if out:
                data = torch.stack([s for _, _, s in out])
                tensors[b.tensor] = TensorPayload(codec="none", shape=tuple(data.shape), parts={"data": data})
                info[b.key] = [[o, r] for o, r, _ in out]
        if payload is not None and payload[0] and msg.kind == Kind.DELTA:  # no instance in flight: no block
            keys, data = payload
            tensors[ESTIMATE_TENSOR] = TensorPayload(codec="none", shape=tuple(data.shape), parts={"data": data})
            info["estimate"] = keys
        return Message(msg.kind, msg.sender, msg.round, msg.seq, msg.inc, tensors, info)
