"""Consensus distance: exact (tests, reports) and estimated online from shared-seed sketches.

Estimator. Every peer sketches its model with the same subsampled randomized Hadamard transform
S (seeded by the run seed, so all peers share it without talking): s_i = S x_i, with k rows.
S is linear, so s_i - mean_j s_j = S (x_i - xbar) and ||S v||^2 is an unbiased estimate of
||v||^2 with relative standard deviation about sqrt(2/k) per independent direction.  Sketches are
flooded through the gossip messages (each peer forwards what a neighbour has not seen), so after
`diameter` rounds every peer holds all n sketches of a round and computes
    Xi_hat(r) = sqrt(1/n sum_i ||s_i(r) - mean_j s_j(r)||^2)
with no collector.  Near consensus the residual x_i - xbar concentrates on the few slowest
eigenvectors of W, so the error does not average out over peers: k = 1024 gives about 4% (one
standard deviation) there, less far from consensus.  Sketches are float64 so that differences
of nearly equal models keep their digits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from p2pfl.core.prng import splitmix64

State = Mapping[str, torch.Tensor]


def flatten(state: State) -> torch.Tensor:
    """Concatenate a state's tensors in name order: the layout every peer agrees on."""
    return torch.cat([state[k].reshape(-1) for k in sorted(state)]) if state else torch.zeros(0)


def exact_distance(states: Iterable[State]) -> float:
    """Xi = sqrt(1/n sum_i ||x_i - xbar||^2), computed from all models (tests and reports)."""
    x = torch.stack([flatten(s).double() for s in states])
    return float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt())


def network_mean(states: Iterable[State]) -> torch.Tensor:
    return torch.stack([flatten(s).double() for s in states]).mean(0)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform of a length-2^m vector (vectorised passes)."""
    m = x.numel()
    h = 1
    y = x
    while h < m:
        y = y.view(-1, 2, h)
        y = torch.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), dim=1)
        h *= 2
    return y.reshape(m) / math.sqrt(m)


class Sketcher:
    """s = sqrt(m/k) P H D x: SRHT with a run-wide seed, O(d log d) per sketch, no d x k matrix.

    x is the model flattened in tensor-name order (float64) and zero-padded to m = the next power
    of two >= its length; D flips signs; H is the orthonormal Walsh-Hadamard matrix in natural
    order, H_ij = (-1)^popcount(i & j) / sqrt(m); P keeps k = min(k, m) rows. D and P come from
    SplitMix64 (`core.prng`) from state (0x5EED xor seed): its first m outputs give the signs (+1
    where the top bit is 0), the next m rank the coordinates, and P keeps the k of lowest rank, in
    rank order. Any implementation rebuilds the same S from the seed (docs/wire.md)."""

    def __init__(self, dim: int, k: int, seed: int) -> None:
        if dim < 1 or k < 1:
            raise ValueError(f"sketch: need dim >= 1 and k >= 1, got dim={dim}, k={k}")
        self.dim = dim
        self.m = 1 << max(0, (dim - 1).bit_length())
        self.k = min(k, self.m)  # the rows a sketch has: on the wire, every peer's are this long
        z = splitmix64(0x5EED ^ seed, 2 * self.m)
        self.signs = torch.from_numpy(np.where(z[: self.m] >> np.uint64(63), -1.0, 1.0))
        self.rows = torch.from_numpy(np.argsort(z[self.m :], kind="stable")[: self.k].astype(np.int64))
        self.scale = math.sqrt(self.m / self.k)

    def __call__(self, x: torch.Tensor | State) -> torch.Tensor:
        v = flatten(x) if isinstance(x, Mapping) else x.reshape(-1)
        if v.numel() != self.dim:
            raise ValueError(f"sketch: expected a state of {self.dim} values, got {v.numel()}")
        padded = torch.zeros(self.m, dtype=torch.float64)
        padded[: self.dim] = v.double()
        return _fwht(padded * self.signs)[self.rows] * self.scale


@functools.lru_cache(maxsize=8)
def shared_sketcher(dim: int, k: int, seed: int) -> Sketcher:
    """One Sketcher per (dim, k, seed) in a process: co-hosted peers use the same S, and its
    sign vector alone is 8 bytes per padded coordinate."""
    return Sketcher(dim, k, seed)


def sketch_distance(sketches: Iterable[torch.Tensor]) -> float:
    s = torch.stack(list(sketches))
    return float(((s - s.mean(0)) ** 2).sum(1).mean().sqrt())


class SketchBook:
    """Which (origin, round) sketches this peer knows, and which each neighbour still lacks."""

    def __init__(self, me: int, peers: Iterable[int], horizon: int) -> None:
        self.me = me
        self.peers = set(peers)
        self.horizon = max(1, horizon)
        self.entries: dict[tuple[int, int], torch.Tensor] = {}
        self.known_by: dict[int, set[tuple[int, int]]] = {}

    def add(self, origin: int, rnd: int, sketch: torch.Tensor, via: int | None = None) -> bool:
        """Store a sketch; False for an unknown origin or one already known."""
        if origin not in self.peers:
            return False
        key = (origin, rnd)
        if via is not None:
            self.known_by.setdefault(via, set()).add(key)
        if key in self.entries:
            return False
        self.entries[key] = sketch.double()
        return True

    def outgoing(self, neighbor: int, current_round: int) -> list[tuple[int, int, torch.Tensor]]:
        """Sketches of recent rounds the neighbour has not sent us nor received from us."""
        known = self.known_by.setdefault(neighbor, set())
        out = []
        for key in sorted(self.entries):
            if key not in known and key[1] >= current_round - self.horizon:
                out.append((key[0], key[1], self.entries[key]))
                known.add(key)
        return out

    def complete(self, rnd: int) -> bool:
        return all((p, rnd) in self.entries for p in self.peers)

    def estimate(self, rnd: int) -> tuple[float, int]:
        """(Xi_hat, number of peers whose sketch of this round is known)."""
        got = [self.entries[(p, rnd)] for p in sorted(self.peers) if (p, rnd) in self.entries]
        return (sketch_distance(got) if got else float("nan")), len(got)

    def prune(self, before_round: int) -> None:
        for key in [k for k in self.entries if k[1] < before_round]:
            del self.entries[key]
        for known in self.known_by.values():
            known.difference_update({k for k in known if k[1] < before_round})
