"""The consensus estimate a peer keeps of the network, and which round's record can be written yet.

A round's consensus estimate needs every peer's sketch of the model after that round, which
reaches a peer up to `diameter` rounds later; records therefore wait in `RecordQueue` until
their sketch set is complete (or is given up on) and are written in round order.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from p2pfl.core.consensus import SketchBook, Sketcher, flatten
from p2pfl.core.estimate import GossipEstimator
from p2pfl.core.state import State
from p2pfl.core.wire import Message
from p2pfl.node.intake import Intake, LogLimiter
from p2pfl.node.piggyback import Piggyback
from p2pfl.ppfm.levels import level_distances


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


class Monitor:
    """This peer's view of the network's consensus, and the records that wait for it.

    Every round's model is sketched (`core.consensus`); the sketches either flood to every peer
    (`SketchBook`, exact set, O(n) per message) or are gossip-averaged (`GossipEstimator`, O(1) per
    message, a lag). PPFM's fingerprints flood beside them (`fbook`). The blocks ride on the base
    channel's messages (`Piggyback`), and a round's record is written once its estimate is known.
    """

    def __init__(self, me: int, ids: list[int], sketcher: Sketcher | None, diameter: int, estimator: GossipEstimator | None,
                 fingerprint_dim: int | None, log: logging.Logger, every: int = 1, last: int = -1) -> None:
        """`every`, `last`: flooded sketches are taken on round `last` (the one after the last
        training round, whose record then has an estimate) and every `every` rounds before it,
        never on round 0 (the sketch of round r + 1 is round r's estimate)."""
        self.me, self.ids, self.sketcher, self.diameter, self.estimator, self.log = me, ids, sketcher, diameter, estimator, log
        self.every, self.last = every, last
        self._log_partial = LogLimiter()
        self.book = SketchBook(me, ids, horizon=diameter + 2)
        self.fbook = SketchBook(me, ids, horizon=diameter + 2)
        self.piggyback = Piggyback(me, self.book, sketcher.k if sketcher else -1, self.fbook, fingerprint_dim, estimator, diameter)
        self.lag = estimator.cfg.lag if estimator is not None else diameter
        self.queue = RecordQueue(give_up_after=self.lag + 2)
        # Rounds after the last that only carry sketches, so every estimate of a real round lands (>= 1: every delta lands).
        self.drain = max(1, self.lag + 1 if estimator else diameter if sketcher else 1)
        self.estimates: dict[int, float] = {}  # gossip estimator: sketch round -> estimate
        self.labels_at: dict[int, dict[int, int]] = {}  # PPFM: sketch round -> the clustering its record reports
        self._payload: tuple[list[list[int]], torch.Tensor] | None = None

    def sketch(self, rnd: int, model: State) -> None:
        """The model after `rnd` mixing steps, into the flood or a new estimator instance."""
        if self.sketcher is None:
            return
        if self.estimator is None:
            if self.sketched(rnd):
                self.book.add(self.me, rnd, self.sketcher(model))
        elif rnd > 0 and self.estimator.starts(rnd):  # round 0's estimate would be no record's
            self.estimator.add_own(rnd, self.sketcher(model))

    def sketched(self, rnd: int) -> bool:
        """Whether round `rnd`'s models are sketched and flooded."""
        return 0 < rnd <= self.last and (self.last - rnd) % self.every == 0

    def start_sending(self, rnd: int) -> None:
        """This round's estimator payload, the same for every neighbour."""
        self._payload = self.estimator.payload(rnd) if self.estimator is not None else None

    def attach(self, msg: Message, peer: int, rnd: int) -> Message:
        return self.piggyback.attach(msg, peer, rnd, self._payload)

    def take(self, msg: Message, rnd: int) -> tuple[list[tuple[str, str]], list[str]]:
        """File the blocks riding on `msg` (`Piggyback`): (dropped, refused) as (reason, detail) of
        what is dropped without blaming the sender, and why each malformed block was refused."""
        dropped = self.piggyback.take_estimate(msg, rnd)
        more, refused = self.piggyback.take_blocks(msg, rnd)
        return dropped + more, refused

    def mix(self, rnd: int, participants: set[int]) -> None:
        if self.estimator is not None:
            self.estimator.mix(rnd, participants)
            self.estimates.update(self.estimator.ready())

    def push(self, rnd: int, record: dict[str, Any]) -> None:
        self.queue.push(rnd + 1, record)

    def ready(self, last_round: int, force: bool = False) -> list[dict[str, Any]]:
        """Records whose estimate is known (or given up on), in order, with it filled in."""
        out = []
        complete = self.estimator.complete if self.estimator is not None else lambda r: not self.sketched(r) or self.book.complete(r)
        for srnd, rec in self.queue.pop_ready(last_round, complete, force):
            if self.estimator is not None:  # an estimate on the estimator's rounds, null on the others
                rec["consensus_distance"] = self.estimates.pop(srnd, float("nan"))
                rec["consensus_lag"] = self.estimator.cfg.lag
                out.append(rec)
                continue
            if self.sketcher is not None and not self.sketched(srnd):  # between flooded sketch rounds
                rec["consensus_distance"] = float("nan")
                self.labels_at.pop(srnd, None)
                out.append(rec)
                continue
            est, got = self.book.estimate(srnd) if self.sketcher else (float("nan"), 0)
            rec["consensus_distance"] = est
            rec["consensus_peers"] = got
            if self.sketcher is not None and got < len(self.ids):  # an estimate over part of the network says so
                rec["consensus_missing"] = [p for p in self.ids if (p, srnd) not in self.book.entries]
                if self._log_partial():
                    self.log.warning("peer %d: the consensus estimate of round %d rests on %d of %d peers (no sketch from %s)",
                                     self.me, srnd - 1, got, len(self.ids), rec["consensus_missing"])
            labels = self.labels_at.pop(srnd, None)
            if labels is not None and self.sketcher is not None:
                have = {p: self.book.entries[(p, srnd)] for p in self.ids if (p, srnd) in self.book.entries}
                rec["cluster_consensus_distance"], rec["global_consensus_distance"] = level_distances(have, labels, self.me)
            out.append(rec)
        self.book.prune(last_round - self.diameter - 4)
        self.fbook.prune(last_round - self.diameter - 4)
        for r in [r for r in self.estimates if r < last_round - self.queue.give_up_after - 4]:
            del self.estimates[r]
        return out


def round_record(me: int, rnd: int, now: float, round_s: float, waited: float, late: list[int], model: State, stats: dict[str, Any],
                 intake: Intake) -> dict[str, Any]:
    """A round's record as the node knows it when the round ends (the host adds wall time and bytes)."""
    return {
        "peer": me,
        "round": rnd,
        "round_s": round_s,
        "at": now,  # when the round ended, on the host's clock; the host turns it into wall time
        "wait_s": waited,
        "late_neighbors": late,
        "neighbor_distance": stats["neighbor_distance"],
        "model_norm": float(flatten(model).double().norm()),  # the scale the report's relative consensus distance uses
        "payload_bytes": stats["payload_bytes"],
        "compression_ratio": stats["compression_ratio"],
        "compression_error": stats["compression_error"],
        "live_neighbors": stats["live_neighbors"],
        "rejected_messages": intake.rejected,
        "rejected_by_reason": dict(intake.by_reason),
        "misbehaving_marks": intake.conduct.bans,
        "internal_errors": intake.internal_errors,
        "duplicates": stats["duplicates"],
        "late_settled": stats.get("late_settled", 0),
        "gaps_asked": stats.get("gaps_asked", 0),
        "states_applied": stats.get("states_applied", 0),
    }
