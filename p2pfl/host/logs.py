"""Logging of a process that hosts one or many peers: one file per peer, its id in every line."""

from __future__ import annotations

import logging
from pathlib import Path


class PeerFilter(logging.Filter):
    """Route a co-hosted peer's records (loggers `p2pfl.peer.<id>`) to its own log file."""

    def __init__(self, peer: int | None) -> None:
        super().__init__()
        self.peer = peer

    def filter(self, record: logging.LogRecord) -> bool:
        tail = record.name.rsplit(".", 1)[-1]
        record.peer = tail if record.name.startswith("p2pfl.peer.") else "-"
        return self.peer is None or tail == str(self.peer)


def setup_logging(run_dir: Path, peers: list[int], level: str = "INFO") -> None:
    """One log file per peer (`logs/peer-<id>.log`, its id in every line), and stderr."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s peer=%(peer)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[tuple[logging.Handler, int | None]] = [(logging.StreamHandler(), None)]
    for p in peers:  # a single peer's file also gets the process's other records, as before
        handlers.append((logging.FileHandler(run_dir / "logs" / f"peer-{p}.log"), p if len(peers) > 1 else None))
    for h, p in handlers:
        h.setFormatter(fmt)
        h.addFilter(PeerFilter(p))
        root.addHandler(h)
