"""Time-varying topologies: round t's graph and mixing weights from (seed, t) alone.

A topology file's `schedule:` replaces its edges. Every peer builds the same `Schedule` from the
file and the run seed and asks it for round t's graph, so no peer coordinates with another about
who talks to whom in a round. Positions 0..n-1 follow the sorted peer ids. Kinds:

- `one-peer-exponential` (Ying, Yuan, Chen, Hu, Pan, Yin, "Exponential graph is provably
  efficient for decentralized deep training", NeurIPS 2021): with tau = ceil(log2 n) and
  k = t mod tau, peer i sends to i + 2^k and receives from i - 2^k, weight 1/2 each. Doubly
  stochastic; when n is a power of 2 the product of any tau consecutive rounds is exactly
  11^T/n. Its edges recur every tau rounds, which is what CHOCO replicas need (`recurring`).
- `random-regular:D`: a fresh random D-regular graph every round (decentralizepy's
  PeerSamplerDynamic), Metropolis-Hastings weights 1/(D+1). Symmetric, doubly stochastic.
- `epidemic:S` (de Vos, Farhadkhani, Guerraoui, Kermarrec, Pires, Sharma, "Epidemic Learning:
  boosting decentralized learning with randomized communication", NeurIPS 2023, EL-Local):
  every peer sends to S others drawn uniformly each round. In-degrees vary, so no weights from the
  degrees alone are doubly stochastic. Each sender keeps one of S + 1 equal shares and sends one to
  each target: the matrix is column-stochastic, and push-sum weights (Kempe, Dobra, Gehrke,
  "Gossip-based computation of aggregate information", FOCS 2003) turn it into exact averaging.
  With equal push-sum weights a peer's update is the paper's: the mean of its own and the
  received models.

`matrix(t)[i, j]` is the share of peer j's value in peer i's update. Graphs are cached for a few
rounds: co-hosted peers ask for the same rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pfl.errors import P2pflError

KINDS = ("one-peer-exponential", "random-regular", "epidemic")
_CODE = {k: i + 1 for i, k in enumerate(KINDS)}  # keeps the kinds' random streams apart
CACHE_ROUNDS = 16
EXACT = 1e-12  # a product this close to 11^T/n averages exactly


class ScheduleError(P2pflError, ValueError):
    """A schedule spec that cannot be used with these peers; the message names the value."""


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str
    param: int = 0  # D of random-regular, S of epidemic

    def __str__(self) -> str:
        return self.kind if self.kind == "one-peer-exponential" else f"{self.kind}:{self.param}"


def parse_schedule(text: object) -> ScheduleSpec:
    """`one-peer-exponential`, `random-regular:D` or `epidemic:S`."""
    if not isinstance(text, str):
        raise ScheduleError(f"expected one of {', '.join(KINDS)} (with :D or :S), got {text!r}")
    kind, colon, arg = text.strip().partition(":")
    if kind not in KINDS:
        raise ScheduleError(f"unknown schedule {kind!r}; choose one-peer-exponential, random-regular:D or epidemic:S")
    if kind == "one-peer-exponential":
        if colon:
            raise ScheduleError(f"one-peer-exponential takes no parameter, got {text!r}")
        return ScheduleSpec(kind)
    if not arg.isdigit() or int(arg) < 1:
        raise ScheduleError(f"{kind} needs a positive integer ({kind}:{'D' if kind == 'random-regular' else 'S'}), got {text!r}")
    return ScheduleSpec(kind, int(arg))


def check_spec(spec: ScheduleSpec, n: int) -> None:
    """Refuse a schedule that n peers cannot run."""
    if n < 2:
        raise ScheduleError(f"{spec}: a schedule needs at least 2 peers, got {n}")
    if spec.kind != "one-peer-exponential" and spec.param >= n:
        raise ScheduleError(f"{spec}: {spec.param} peers a round, but only {n - 1} others exist")
    if spec.kind == "random-regular" and (n * spec.param) % 2:
        raise ScheduleError(f"{spec}: no {spec.param}-regular graph on an odd number of peers ({n})")


@dataclass(frozen=True)
class RoundGraph:
    """Round t's directed graph over peer ids and the mixing row of every peer."""

    round: int
    out: dict[int, tuple[int, ...]]  # peers i sends to
    inn: dict[int, tuple[int, ...]]  # peers i receives from
    weights: dict[int, dict[int, float]]  # weights[i][j]: share of j's value in i's update (i itself included)

    def matrix(self, ids: Sequence[int]) -> np.ndarray:
        index = {p: k for k, p in enumerate(ids)}
        w = np.zeros((len(ids), len(ids)))
        for i, row in self.weights.items():
            for j, v in row.items():
                w[index[i], index[j]] = v
        return w


def random_regular_edges(n: int, d: int, rng: np.random.Generator, tries: int = 200) -> list[tuple[int, int]]:
    """A random simple d-regular graph on 0..n-1 by the pairing model: shuffle the n*d endpoints,
    pair them, keep the pairs that are neither loops nor repeats and shuffle the rest again;
    start over when a shuffle makes no progress. Close to uniform for small d."""
    for _ in range(tries):
        edges: set[tuple[int, int]] = set()
        pool = np.repeat(np.arange(n), d)
        while pool.size:
            rng.shuffle(pool)
            left: list[int] = []
            for a, b in pool.reshape(-1, 2).tolist():
                e = (min(a, b), max(a, b))
                if a == b or e in edges:
                    left += [a, b]
                else:
                    edges.add(e)
            if len(left) == pool.size:
                break
            pool = np.array(left, dtype=np.int64)
        else:
            return sorted(edges)
    raise ScheduleError(f"random-regular:{d}: no simple graph on {n} peers in {tries} draws")


@dataclass
class Schedule:
    spec: ScheduleSpec
    ids: tuple[int, ...]
    seed: int = 0
    _cache: dict[int, RoundGraph] = field(default_factory=dict, repr=False)
    _memo: dict[str, float | int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.ids = tuple(sorted(self.ids))
        check_spec(self.spec, len(self.ids))

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def period(self) -> int:
        """Rounds after which every edge has come back: tau for one-peer-exponential, 0 when edges
        do not recur (fresh random graphs)."""
        return math.ceil(math.log2(self.n)) if self.spec.kind == "one-peer-exponential" else 0

    @property
    def recurring(self) -> bool:
        """Edges come back every `period` rounds, so a public copy per edge (CHOCO) stays in use."""
        return self.period > 0

    @property
    def push_sum(self) -> bool:
        return self.spec.kind == "epidemic"

    def graph(self, t: int) -> RoundGraph:
        if t < 0:
            raise ScheduleError(f"round {t}: rounds start at 0")
        g = self._cache.get(t)
        if g is None:
            g = self._draw(t)
            if len(self._cache) >= CACHE_ROUNDS:
                del self._cache[min(self._cache)]
            self._cache[t] = g
        return g

    def matrix(self, t: int) -> np.ndarray:
        return self.graph(t).matrix(self.ids)

    def _rng(self, t: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % (1 << 63), t, _CODE[self.spec.kind]])

    def _draw(self, t: int) -> RoundGraph:
        n, ids = self.n, self.ids
        if self.spec.kind == "one-peer-exponential":
            hop = 1 << (t % self.period)
            pairs = [(ids[i], ids[(i + hop) % n]) for i in range(n)]
        elif self.spec.kind == "random-regular":
            edges = random_regular_edges(n, self.spec.param, self._rng(t))
            pairs = [(ids[a], ids[b]) for a, b in edges] + [(ids[b], ids[a]) for a, b in edges]
        else:
            rng = self._rng(t)
            pairs = []
            for i in range(n):
                picks = rng.choice(n - 1, size=self.spec.param, replace=False)
                pairs += [(ids[i], ids[int(j) + int(j >= i)]) for j in sorted(picks)]
        out: dict[int, list[int]] = {p: [] for p in ids}
        inn: dict[int, list[int]] = {p: [] for p in ids}
        for a, b in pairs:
            out[a].append(b)
            inn[b].append(a)
        # one-peer: 1/2; D-regular: the MH weight 1/(D+1); epidemic: each sender's share 1/(S+1)
        share = 0.5 if self.spec.kind == "one-peer-exponential" else 1.0 / (self.spec.param + 1)
        weights: dict[int, dict[int, float]] = {}
        for p in ids:
            row = {j: share for j in inn[p]}
            row[p] = share if self.push_sum else 1.0 - math.fsum(row.values())
            weights[p] = row
        return RoundGraph(t, {p: tuple(sorted(v)) for p, v in out.items()}, {p: tuple(sorted(v)) for p, v in inn.items()}, weights)

    # ------------------------------------------------------------ figures every peer computes alike

    def _products(self, stop: float, horizon: int) -> list[float]:
        """||diag(P 1)^-1 P - 11^T/n||_2 for P = A_{t-1}...A_0, t = 1, 2, ... until it is <= `stop`
        (at most `horizon` rounds): how far the (push-sum) estimates can be from the mean after t
        rounds of exact gossip."""
        n = self.n
        p = np.eye(n)
        out: list[float] = []
        while len(out) < horizon and (not out or out[-1] > stop):
            p = self.matrix(len(out)) @ p
            out.append(float(np.linalg.norm(p / p.sum(1, keepdims=True) - 1.0 / n, 2)))
        return out

    def contraction(self, horizon: int = 64) -> float:
        """The per-round contraction of exact gossip on this schedule: ||M_T||^(1/T), with M_T as in
        `_products` and T the first round with ||M_T|| <= 1e-6 (at most `horizon`); 0 when T rounds
        average exactly. For a static graph this is lambda."""
        if "contraction" not in self._memo:
            norms = self._products(1e-6, horizon)
            self._memo["contraction"] = 0.0 if norms[-1] <= EXACT else norms[-1] ** (1.0 / len(norms))
        return float(self._memo["contraction"])

    def rounds_to(self, reduction: float, horizon: int = 512) -> int:
        """Rounds T after which exact gossip has cut every disagreement `reduction`-fold."""
        return len(self._products(reduction, horizon))

    def flood_rounds(self, starts: int = 8, cap: int = 64) -> int:
        """Rounds of messages until what every peer sends in a round has reached every peer (each
        message carries what its sender knows): the schedule's counterpart of a diameter. The
        worst over the first `starts` rounds."""
        if "flood" not in self._memo:
            worst = 0
            for s in range(starts):
                known = np.eye(self.n, dtype=bool)
                for t in range(s, s + cap):
                    known = (self.matrix(t) > 0).astype(np.int64) @ known.astype(np.int64) > 0
                    if known.all():
                        worst = max(worst, t - s + 1)
                        break
                else:
                    raise ScheduleError(f"{self.spec}: a message from round {s} does not reach every peer in {cap} rounds")
            self._memo["flood"] = worst
        return int(self._memo["flood"])

    def out_degree(self) -> int:
        """Messages a peer sends per round."""
        return 1 if self.spec.kind == "one-peer-exponential" else self.spec.param
