"""PPFM clustering and meta-levels: pure, deterministic functions every peer evaluates alike.

Every peer holds the same update fingerprints (shared-seed sketches of u_i = x_i(after local
steps) - x_i(before), flooded like the consensus sketches), so clustering needs no coordinator
provided the computation is a deterministic function of the fingerprints that does not care about
dict order or last-bit float differences between peers (different BLAS, different summation
order). Hence:

* Cosine similarities are rounded to the grid 2^-16 (`GRID`) as integers once; everything after
  that (cluster sums, merges, silhouettes) is integer arithmetic or single correctly rounded IEEE
  operations in a fixed order, so the result is bit-identical on every peer. Perturbations far
  below the grid (1e-12) change a grid value only when a similarity sits within 1e-12 of a
  rounding boundary, about one chance in 10^7 per pair.
* Clustering is average-linkage agglomeration on these similarities, ties broken by smallest peer
  id. With tens of peers it is cheap; unlike spectral clustering or k-means it has no random
  init, no eigenvector sign/order ambiguity and no iterative solver whose last bits depend on the
  platform, and average linkage (unlike single linkage) does not chain noisy groups together.
* `"auto"` picks k in 2..max_k maximising the mean silhouette (distance 1 - cos) of the dendrogram
  cut, and keeps one cluster unless that silhouette reaches `split_bar` = max(0.25, 2 sqrt(2/m))
  for m-row fingerprints. In a homogeneous population pairwise distances concentrate around one
  value and only sketch/sampling noise (relative size ~ sqrt(2/m)) separates them, so the best
  split scores low: measured on isotropic Gaussian points with 200 draws each, its 99th percentile
  is 0.21 (m = 64, n = 8), 0.10 (m = 256), 0.05 (m = 1024), and 0.40 at m = 32, n = 4, which the
  2 sqrt(2/m) term covers. Planted groups (m = 1024) score about 0.45 at within-group cosine 0.5
  and 0.3 at 0.3, but only 0.17 at 0.2: such weak structure is left unsplit on purpose, because
  real update noise is anisotropic (fewer effective dimensions than m), and a missed split only
  costs plain single-population training while a false one splits the data for nothing.
* Labels are canonical: clusters numbered in order of their smallest member id.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import numpy as np
import torch

from p2pfl.config import PeerConfig
from p2pfl.core.topology import PeerSpec, Topology
from p2pfl.errors import P2pflError

Fingerprints = Mapping[int, torch.Tensor | np.ndarray]
Labels = dict[int, int]
StateDict = Mapping[str, torch.Tensor]
K = int | Literal["auto"]

GRID = 1 << 16  # similarities are compared in units of 2^-16
MIN_SILHOUETTE = 0.25  # floor of the "auto" acceptance bar; see the module docstring


class ClusterError(P2pflError, ValueError):
    """Fingerprints, labels, states or settings the clustering cannot use; the message says which."""


def _check_k(k: K) -> None:
    if k != "auto" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ClusterError(f"cluster: k must be a positive int or 'auto', got {k!r}")


def split_bar(dim: int, min_silhouette: float = MIN_SILHOUETTE) -> float:
    """Silhouette a split of `dim`-row fingerprints must reach to beat one cluster."""
    return max(min_silhouette, 2.0 * math.sqrt(2.0 / max(dim, 1)))


def similarity_grid(fps: Fingerprints) -> tuple[list[int], np.ndarray, int]:
    """(sorted ids, int64 cosine similarities in units of 1/GRID with diagonal GRID, fingerprint length).

    A zero fingerprint (a peer that did not move) has similarity 0 with everyone.
    """
    ids = sorted(fps)
    if not ids:
        return ids, np.zeros((0, 0), dtype=np.int64), 0
    rows = []
    for p in ids:
        v = fps[p]
        a = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
        rows.append(a.reshape(-1))
    dims = {r.size for r in rows}
    if len(dims) != 1:
        raise ClusterError(f"cluster: fingerprints of different lengths {sorted(dims)}")
    u = np.stack(rows)
    if not np.isfinite(u).all():
        bad = [p for p, r in zip(ids, rows, strict=True) if not np.isfinite(r).all()]
        raise ClusterError(f"cluster: non-finite fingerprint from peers {bad}")
    norms = np.linalg.norm(u, axis=1)
    u = np.divide(u, norms[:, None], out=np.zeros_like(u), where=norms[:, None] > 0)
    c = np.clip(u @ u.T, -1.0, 1.0)
    upper = np.triu(np.rint(c * GRID).astype(np.int64), 1)  # one value per pair: exactly symmetric
    return ids, upper + upper.T + GRID * np.eye(len(ids), dtype=np.int64), u.shape[1]


def _dendrogram(s: np.ndarray, down_to: int) -> dict[int, np.ndarray]:
    """Average-linkage cuts {m: labels} for m = n..down_to; labels canonical at every cut.

    Clusters stay in order of their smallest member, and merging b into a (a < b) keeps that
    order, so the index of a cluster is its canonical label. `t` holds exact integer sums of
    pairwise similarities between clusters; the merge maximises t / (n_a n_b), first pair in
    row-major order on ties.
    """
    n = s.shape[0]
    labels = np.arange(n)
    t = s.copy()
    sizes = np.ones(n, dtype=np.int64)
    cuts = {n: labels.copy()}
    for m in range(n, max(down_to, 1), -1):
        avg = t / np.outer(sizes, sizes)
        avg[np.tril_indices(m)] = -np.inf
        a, b = divmod(int(np.argmax(avg)), m)
        t[a] += t[b]
        t[:, a] += t[:, b]
        t = np.delete(np.delete(t, b, 0), b, 1)
        sizes[a] += sizes[b]
        sizes = np.delete(sizes, b)
        labels[labels == b] = a
        labels[labels > b] -= 1
        cuts[m - 1] = labels.copy()
    return cuts


def _silhouette(s: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with distance 1 - cos (in grid units); 0 for one cluster or all singletons.

    Same convention as sklearn (a singleton's value is 0), computed with exact integer sums, a
    fixed elementwise order and math.fsum so that it is identical on every peer.
    """
    n = len(labels)
    m = int(labels.max()) + 1 if n else 0
    if m < 2 or m >= n:
        return 0.0
    d = GRID - s
    onehot = np.zeros((n, m), dtype=np.int64)
    onehot[np.arange(n), labels] = 1
    sums = d @ onehot
    sizes = onehot.sum(0)
    own = sizes[labels]
    a = sums[np.arange(n), labels] / np.maximum(own - 1, 1)
    other = sums / sizes
    other[np.arange(n), labels] = np.inf
    b = other.min(1)
    top = np.maximum(a, b)
    sil = np.where((own > 1) & (top > 0), (b - a) / np.where(top > 0, top, 1.0), 0.0)
    return math.fsum(sil.tolist()) / n


def _as_labels(ids: list[int], labels: np.ndarray) -> Labels:
    return {p: int(c) for p, c in zip(ids, labels, strict=True)}


def canonical(labels: Mapping[int, int]) -> Labels:
    """Relabel so cluster ids are 0, 1, ... in order of each cluster's smallest member."""
    order: dict[int, int] = {}
    for p in sorted(labels):
        order.setdefault(labels[p], len(order))
    return {p: order[labels[p]] for p in sorted(labels)}


def best_cut(fps: Fingerprints, max_k: int = 8) -> tuple[Labels, float]:
    """The dendrogram cut into 2..min(max_k, n-1) clusters with the best mean silhouette (smaller k
    on ties), and that silhouette; one cluster and -inf with fewer than 3 peers."""
    ids, s, _ = similarity_grid(fps)
    top = min(max_k, len(ids) - 1)
    if top < 2:
        return dict.fromkeys(ids, 0), -math.inf
    cuts = _dendrogram(s, 2)
    best, best_sil = 2, -math.inf
    for m in range(2, top + 1):
        sil = _silhouette(s, cuts[m])
        if sil > best_sil:
            best, best_sil = m, sil
    return _as_labels(ids, cuts[best]), best_sil


def cluster_fingerprints(
    fps: Fingerprints, k: K = "auto", max_k: int = 8, min_silhouette: float = MIN_SILHOUETTE
) -> Labels:
    """Peer -> canonical cluster label from update fingerprints (see the module docstring).

    An int k larger than the number of peers is clamped (peers may have left). With "auto" the
    best cut (`best_cut`) wins, and one cluster is returned unless its silhouette reaches
    `split_bar(fingerprint length, min_silhouette)`.
    """
    _check_k(k)
    ids, s, dim = similarity_grid(fps)
    n = len(ids)
    if n == 0:
        return {}
    if k != "auto":
        return _as_labels(ids, _dendrogram(s, min(k, n))[min(k, n)])
    labels, sil = best_cut(fps, max_k)
    return labels if sil >= split_bar(dim, min_silhouette) else dict.fromkeys(ids, 0)


def quality(labels: Mapping[int, int], fps: Fingerprints, min_silhouette: float = MIN_SILHOUETTE) -> float:
    """How well `labels` fit `fps`: mean silhouette, or the "auto" acceptance bar for one cluster.

    Scoring one cluster at that bar puts "split" and "don't split" on one scale, which is what the
    hysteresis in `ClusterState` compares.
    """
    ids, s, dim = similarity_grid(fps)
    if set(ids) != set(labels):
        raise ClusterError("cluster: labels and fingerprints cover different peers")
    lab = canonical(labels)
    arr = np.array([lab[p] for p in ids], dtype=np.int64)
    if len(ids) == 0 or arr.max() == 0:
        return split_bar(dim, min_silhouette)
    return _silhouette(s, arr)


@dataclass
class ClusterState:
    """Cluster assignment with hysteresis, re-evaluated every `every` rounds.

    Before anything is split the population counts as one cluster, and a fresh split replaces it
    only if, on the current fingerprints, its quality beats that by at least `margin` (an explicit
    k splits at the first evaluation). Once a split is held, clusters only split further, as in
    clustered FL's recursive bipartitioning (Sattler et al., IEEE TNNLS 2020): a cluster of
    "auto" whose own best cut, on its members' fingerprints centred among themselves, reaches the
    split bar plus `margin` is divided; peers never move between held clusters and clusters never
    merge. Fingerprints accumulate updates relative to each peer's cluster model, so once the
    clusters are right what told them apart stops growing while each peer's label skew keeps
    adding the same direction every round; re-partitioning from scratch on them drifted to a split
    by label skew across the true clusters (docs/experiments.md#ppfm-fingerprints). A change of
    the peer set adopts the fresh assignment (new peers need a label). Every peer that feeds the
    same fingerprints at the same rounds holds the same state; a late joiner copies it from a
    neighbour (`to_dict`).
    """

    k: K = "auto"
    every: int = PeerConfig.recluster_every
    margin: float = PeerConfig.cluster_margin
    max_k: int = 8
    min_silhouette: float = MIN_SILHOUETTE
    labels: Labels = field(default_factory=dict)
    adopted_round: int | None = None
    evaluated_round: int | None = None
    # At the last evaluation: the best cut's silhouette, the bar "auto" holds it to, and the held
    # labels' quality (what a fresh assignment must beat by `margin`). How near a split came.
    scores: dict[str, float] = field(default_factory=dict, compare=False)  # a report, not state: not in `to_dict`

    def __post_init__(self) -> None:
        _check_k(self.k)
        if self.every < 1 or self.margin < 0:
            raise ClusterError(f"cluster: need every >= 1 and margin >= 0, got {self.every}, {self.margin}")

    def due(self, rnd: int) -> bool:
        """On the global round grid (not "since my last evaluation"), so all peers agree."""
        return rnd % self.every == 0

    def update(self, fps: Fingerprints, rnd: int) -> bool:
        """Evaluate now; True if the labels changed."""
        fresh = cluster_fingerprints(fps, self.k, self.max_k, self.min_silhouette)
        self.evaluated_round = rnd
        old = self.labels or (dict.fromkeys(fresh, 0) if self.k == "auto" else fresh)
        held = quality(old, fps, self.min_silhouette) if set(fresh) == set(old) else math.nan
        self.scores = {"best_split_silhouette": best_cut(fps, self.max_k)[1],
                       "split_bar": split_bar(similarity_grid(fps)[2], self.min_silhouette), "held_quality": held}
        new = fresh
        if set(fresh) == set(old) and len(set(old.values())) > 1:
            new = self._refine(old, fps, self.scores["split_bar"] + self.margin)
        elif fresh != old and set(fresh) == set(old):
            gain = quality(fresh, fps, self.min_silhouette) - held
            if gain < self.margin:
                new = old
        if new == self.labels:
            return False
        self.labels, self.adopted_round = new, rnd
        return True

    def _refine(self, held: Labels, fps: Fingerprints, bar: float) -> Labels:
        """`held` with each cluster split where its own fingerprints cut with a silhouette of at
        least `bar` (the split bar plus the margin); unchanged with an explicit k, which the held
        split already has."""
        if self.k != "auto":
            return held
        out, fresh_label = dict(held), max(held.values()) + 1
        for c in sorted(set(held.values())):
            ms = members(held, c)
            rows = {p: torch.as_tensor(fps[p], dtype=torch.float64).reshape(-1) for p in ms}
            mean = torch.stack(list(rows.values())).mean(0)
            cut, sil = best_cut({p: v - mean for p, v in rows.items()}, self.max_k)
            if sil >= bar:
                for p in ms:
                    if cut[p] > 0:
                        out[p] = fresh_label + cut[p] - 1
                fresh_label += max(cut.values())
        return canonical(out)

    def step(self, fps: Fingerprints, rnd: int) -> bool:
        return self.update(fps, rnd) if self.due(rnd) else False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-friendly form (peer ids as ints, no pickle)."""
        return {"k": self.k, "every": self.every, "margin": self.margin, "max_k": self.max_k,
                "min_silhouette": self.min_silhouette, "labels": sorted(self.labels.items()),
                "adopted_round": self.adopted_round, "evaluated_round": self.evaluated_round}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterState:
        fields = {key: d[key] for key in ("k", "every", "margin", "max_k", "min_silhouette",
                                          "adopted_round", "evaluated_round") if key in d}
        return cls(**fields, labels={int(p): int(c) for p, c in d.get("labels", [])})


# ---------------------------------------------------------------- overlays

def members(labels: Mapping[int, int], cluster: int) -> list[int]:
    return sorted(p for p, c in labels.items() if c == cluster)


def representative(labels: Mapping[int, int], cluster: int) -> int:
    """The cluster's smallest peer id: needs no data, and stays put while the labels do, so the
    representatives' overlay does not churn with fingerprint noise."""
    m = members(labels, cluster)
    if not m:
        raise ClusterError(f"cluster: no peer has label {cluster}")
    return m[0]


def connect(nodes: Iterable[int], base_graph: nx.Graph) -> nx.Graph:
    """The base graph induced on `nodes`, plus a ring over them in id order if that is disconnected.

    Induced edges are existing links; the ring makes the overlay connected with at most two extra
    links per peer, chosen the same way by every peer.
    """
    ordered = sorted(set(nodes))
    g = nx.Graph()
    g.add_nodes_from(ordered)
    g.add_edges_from(base_graph.subgraph(ordered).edges)
    if len(ordered) > 1 and not nx.is_connected(g):
        g.add_edges_from(zip(ordered, ordered[1:] + ordered[:1], strict=True))
        g.remove_edges_from(nx.selfloop_edges(g))
    return g


def overlay_topology(graph: nx.Graph, peers: Mapping[int, PeerSpec] | None = None) -> Topology:
    """An overlay as a `Topology`, to reuse its Metropolis-Hastings weights and spectral tools.

    Pass the run's `peers` to keep real endpoints; otherwise endpoints are placeholders.
    """
    specs = {p: (peers[p] if peers is not None else PeerSpec(p, "", 0)) for p in graph.nodes}
    return Topology(peers=specs, graph=graph, name="overlay")


@dataclass(frozen=True)
class Overlay:
    """Gossip graphs of the meta-levels: one per cluster, and one among the representatives
    (whose MH average is the unweighted mean over clusters: each cluster counts as one task)."""

    clusters: dict[int, nx.Graph]
    representatives: dict[int, int]
    reps: nx.Graph

    def cluster_topology(self, cluster: int, peers: Mapping[int, PeerSpec] | None = None) -> Topology:
        return overlay_topology(self.clusters[cluster], peers)


def overlay(labels: Mapping[int, int], base_graph: nx.Graph) -> Overlay:
    clusters = {c: connect(members(labels, c), base_graph) for c in sorted(set(labels.values()))}
    reps = {c: representative(labels, c) for c in clusters}
    return Overlay(clusters, reps, connect(reps.values(), base_graph))


def mh_weights(graph: nx.Graph, peer: int) -> dict[int, float]:
    """Metropolis-Hastings row of `peer` on an overlay (same rule as the base topology)."""
    return overlay_topology(graph).mh_weights(peer)


# ---------------------------------------------------------------- meta-level updates

def _lerp(a: StateDict, b: StateDict, w: float, what: str) -> dict[str, torch.Tensor]:
    if not 0.0 <= w <= 1.0:
        raise ClusterError(f"cluster: {what} must be in [0, 1], got {w}")
    if set(a) != set(b):
        raise ClusterError(f"cluster: states differ in keys: {sorted(set(a) ^ set(b))}")
    out = {}
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            raise ClusterError(f"cluster: {name}: shapes {tuple(x.shape)} and {tuple(y.shape)}")
        work = torch.promote_types(x.dtype, torch.float32)
        out[name] = torch.lerp(x.to(work), y.to(work), w).to(x.dtype)
    return out


def cluster_update(theta_c: StateDict, mean_phi: StateDict, beta: float) -> dict[str, torch.Tensor]:
    """Reptile cluster step theta_c + beta (mean_{i in c} phi_i - theta_c); inputs untouched."""
    return _lerp(theta_c, mean_phi, beta, "beta")


def global_pull(theta_c: StateDict, theta_g: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """Pull of a cluster model toward the global meta model: theta_c + lam (theta_g - theta_c)."""
    return _lerp(theta_c, theta_g, lam, "lam")
