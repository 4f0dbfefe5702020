"""Per-round JSONL records, and which round's record can be written yet.

A round's consensus estimate needs every peer's sketch of the model after that round, which
reaches a peer up to `diameter` rounds later; records therefore wait in `RecordQueue` until
their sketch set is complete (or is given up on) and are written in round order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class JsonlWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a crash can leave a torn last line; appending after it would glue two records
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.path.write_bytes(data[: data.rfind(b"\n") + 1])
        self._f = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._f.close()


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


class PromExporter:
    """Serves the latest round record of this peer for Prometheus scraping (--metrics-port).

    A private registry, so several peers in one process (tests) do not collide; numeric fields of
    the record become gauges `p2pfl_<field>{peer="<id>"}`, created as they first appear."""

    def __init__(self, port: int, peer: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self._gauge_cls = Gauge
        self.registry = CollectorRegistry()
        self.peer = str(peer)
        self.gauges: dict[str, Any] = {}
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)

    def update(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key == "peer" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key not in self.gauges:
                self.gauges[key] = self._gauge_cls(f"p2pfl_{key}", f"p2pfl per-round metric {key}", ["peer"], registry=self.registry)
            self.gauges[key].labels(peer=str(record.get("peer", self.peer))).set(value)  # co-hosted peers: one exporter

    def close(self) -> None:
        self.server.shutdown()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn final line (a peer killed mid-write) is ignored."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for k, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if k != len(lines) - 1:
                raise
    return out


def fairness_figures(accuracies: Sequence[float | None], unseen: Sequence[float | None] = ()) -> dict[str, float | int]:
    """Spread of per-peer accuracy: how unequally a run serves its peers (Hao et al., CVPR 2021).

    ``std`` is the population standard deviation across peers; ``worst10`` the mean accuracy of the
    worst 10% of peers (at least one peer); ``worst_gap`` = mean - worst peer. ``unseen_mean``
    averages each peer's accuracy on classes it never saw locally, over peers that have such
    classes. Missing or non-finite values are skipped.
    """
    acc = sorted(v for v in accuracies if v is not None and math.isfinite(v))
    out: dict[str, float | int] = {"peers": len(acc)}
    if acc:
        mean = math.fsum(acc) / len(acc)
        k = max(1, math.ceil(0.1 * len(acc)))
        out.update(
            mean=mean,
            std=math.sqrt(math.fsum((v - mean) ** 2 for v in acc) / len(acc)),
            worst=acc[0],
            worst10=math.fsum(acc[:k]) / k,
            worst_gap=mean - acc[0],
        )
    seen_not = [v for v in unseen if v is not None and math.isfinite(v)]
    if seen_not:
        out.update(unseen_mean=math.fsum(seen_not) / len(seen_not), unseen_peers=len(seen_not))
    return out
