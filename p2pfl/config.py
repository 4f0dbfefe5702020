"""A peer's settings, each default defined here once, and the parsers of the peer-set flags.

Pure and light: the CLI validates a config with this module before importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the flag or key and the value."""


@dataclass
class PeerConfig:
    topology: Path
    id: int
    rounds: int = 50
    run_dir: Path = Path("runs/default")
    seed: int = 0
    no_train: bool = False
    dim: int = 131072  # --no-train state size (floats)
    compress: str = "none"
    gamma: float | None = None
    sketch_dim: int = 1024
    estimator: str = "auto"  # consensus estimate: flood (every sketch to every peer), gossip (averaged), auto
    heartbeat: float = 1.0  # seconds between heartbeats
    peer_timeout: float = 10.0  # silent this long => marked down
    min_wait: float = 2.0  # floor of the adaptive round deadline
    round_timeout: float = 120.0  # ceiling of the adaptive round deadline
    startup_timeout: float = 60.0
    max_frame: int = 256 * 1024 * 1024
    keep_memory: bool = True  # fixed glibc malloc thresholds: received messages reuse freed pages (p2pfl.alloc)
    checkpoint_every: int = 0
    resume: bool = False
    robust: str = "off"  # off, clip[:TAU], trimmed:B, median
    norm_factor: float = 0.0  # reject deltas this many times the recent median norm (0: off, the default)
    byzantine: str = "off"  # fault injection for experiments: scale:F or noise:S (this peer misbehaves)
    metrics_port: int = 0  # serve Prometheus metrics on 127.0.0.1:PORT (0: off)
    metrics_host: str = "127.0.0.1"
    secret_key: Path | None = None  # CurveZMQ secret key file; default <topology dir>/keys/peer-<id>.key_secret
    round_period: float = 0.0  # a round lasts at least this long (paced gossip)
    max_lag: int = 10  # neighbours more rounds behind than this are neither waited for nor mixed
    clusters: str = "off"  # PPFM meta-levels: off, auto, or a fixed number of clusters
    recluster_every: int = 5  # R: rounds between cluster evaluations
    global_every: int = 5  # K: rounds between global-level gossip among representatives
    global_lambda: float = 0.05  # pull of each cluster model toward the global model
    cluster_beta: float = 1.0  # Reptile step of the cluster model toward its members' task models
    cluster_margin: float = 0.1  # hysteresis: silhouette gain a new clustering needs
    fingerprint_dim: int = 256  # rows of the fingerprint sketch
    threads: int = 0  # training worker threads (each its own model copy); 0: one per core, at most one per peer
    trainer: dict[str, Any] = field(default_factory=dict)


def worker_threads(threads: int, peers: int, cores: int) -> int:
    """Training workers of a process. Each trains its share of the co-hosted peers one at a time
    on its own copy of the frozen model, with single-threaded torch ops: small-batch steps gain
    little from intra-op threads, and separate workers keep every core busy."""
    if threads < 0:
        raise ConfigError(f"--threads: expected 0 (auto) or a positive count, got {threads}")
    return max(1, min(peers, threads or cores))


def parse_ids(spec: str, ids: list[int], local: set[int] | None = None) -> list[int]:
    """`--id`: one id, a range `0-63`, a list `1,5,7-9`, or `local` (the ids in `local`)."""
    text = spec.strip()
    if text == "local":
        if not local:
            raise ConfigError("--id local: no peer of the topology has a host address of this machine")
        return sorted(local)
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise ConfigError(f"--id: {part.strip()!r} is not an id, a range A-B or 'local'") from None
        if b < a:
            raise ConfigError(f"--id: empty range {part.strip()!r}")
        out.extend(range(a, b + 1))
    unknown = sorted(set(out) - set(ids))
    if unknown:
        raise ConfigError(f"--id: peers {unknown[:8]} are not in the topology (ids {ids[0]}..{ids[-1]})")
    if len(set(out)) != len(out):
        raise ConfigError(f"--id: {spec!r} names a peer twice")
    return sorted(out)
