"""Consensus distance by pipelined gossip averaging: per-message cost independent of n (sans-IO).

Why.  Flooding every peer's sketch (`consensus.SketchBook`) costs O(n) sketches per message and
O(n^2) per round, and a round's estimate arrives `diameter` rounds later.  Here each message
carries at most `in_flight` rows of k + 1 float64 (see `EstimatorConfig.max_in_flight`), whatever n.

Method.  W is the Metropolis-Hastings matrix the model gossip uses: symmetric, doubly stochastic,
lambda = ||W - 11^T/n||_2 < 1 on a connected graph.  An *instance* starts on every sketch round r
with r % every == 0; peer i holds its own sketch s_i = S x_i(r) (k rows, `consensus.Sketcher`).

  Stage A (average consensus; Xiao & Boyd 2004, "Fast linear iterations for distributed averaging"):
      v_i(0) = s_i,   v_i(t+1) = sum_j W_ij v_j(t)            -> s_bar = 1/n sum_j s_j
  Stage B (dynamic average consensus / tracking, run in the same messages; Spanos, Olfati-Saber &
  Murray 2005, "Dynamic consensus on mobile networks"; Zhu & Martinez 2010, "Discrete-time dynamic
  average consensus", Automatica 46(2)):
      e_i(t) = ||s_i - v_i(t)||^2,   y_i(0) = e_i(0) = 0,
      y_i(t+1) = sum_j W_ij y_j(t) + e_i(t+1) - e_i(t).
  After `lag` steps peer i reads  Xi_i = sqrt(max(y_i(lag), 0)).

Target: Xi_hat(r) = sqrt(1/n sum_i ||s_i - s_bar||^2) = `consensus.sketch_distance` of the round's
sketches, which is what flooding computes (the sketch's own error, ~sqrt(2/k) per independent
direction of x_i - xbar, comes on top, exactly as for flooding; see `consensus`).

Error analysis.  Let D be the n x k matrix of centred sketches (rows s_i - s_bar), so
||D||_F^2 = n Xi_hat^2, and M = max_i ||s_i - s_bar||.
 1. Exact invariant: since 1^T W = 1^T, mean_i v_i(t) = s_bar and mean_i y_i(t) = mean_i e_i(t) at
    every t (tested to rounding).
 2. The mean is relative: s_i - v_i(t) = ((I - W^t) D)_i, so mean_i e_i(t) = 1/n ||(I - W^t) D||_F^2
    and, the eigenvalues of W^t on centred vectors lying in [-lambda^t, lambda^t],
        |sqrt(mean_i e_i(t)) / Xi_hat - 1| <= lambda^t             (equality when D lies on the
    eigenvector(s) of W whose eigenvalue is +lambda).  The error is measured in units of the
    consensus distance itself, not of ||x||: gossiping ||s_i||^2 and subtracting ||v_i||^2 would
    cancel catastrophically near consensus, which is why the deviation is tracked instead.
 3. Disagreement of y: y(t+1) - ybar(t+1)1 = (W - J)(y(t) - ybar(t)1) + (I - J) de(t), with
    de(t) = e(t+1) - e(t), |de_i(t)| <= ||v_i(t+1) - v_i(t)|| * ||2 s_i - v_i(t) - v_i(t+1)||, and
    ||V(t+1) - V(t)||_F = ||(W - I) W^t D||_F <= (1 + lambda) lambda^t ||D||_F.  Rows of W^t are
    convex, so ||2 s_i - v_i(t) - v_i(t+1)|| <= 4M, and summing the geometric series gives
        |y_i(t) - ybar(t)| <= B_t Xi_hat^2,   B_t = 4 (1 + lambda) t lambda^(t-1) sqrt(n) M / Xi_hat.
 Together, since |sqrt(max(a + d, 0)) - sqrt(a)| <= |d| / sqrt(a)  (`error_bound`):
        |Xi_i / Xi_hat - 1| <= lambda^t + B_t / (1 - lambda^t).
 B_t is a worst case (all of ||de|| on one peer, M / Xi_hat up to sqrt(n)) and is loose by orders
 of magnitude in practice.  What one sees (tests/test_estimate.py, `python bench/estimator.py`;
 figures in docs/benchmarks.md): near consensus, where the residual x_i - xbar has been filtered
 onto the slowest modes of W by the model gossip, the worst peer's error is close to lambda^t
 (until the float64 floor below), i.e. the relative error at the default lag is about `target`;
 with independent random states (energy in every mode) it is far smaller.  The tests check the
 exact invariant, the mean part against lambda^t, every peer against `error_bound` at every t,
 and the decay rate against log(lambda).  A float64 floor
 of about eps * ||s|| / Xi_hat appears once Xi_hat / ||s|| < 1e-9.

Defaults (`EstimatorConfig.for_topology`).  lag = smallest L >= 2 with lambda^L <= target
(0.01), capped at max_lag (64); L >= 2 because on a complete graph (lambda = 0) v is exact after
one step but y needs a second to average.  every = ceil(lag / in_flight) with in_flight = 4, so at
most 4 instances ride on a message: <= 4 * (k + 1) * 8 = 32,800 bytes at k = 1024, independent of n
(flooding: every peer receives n - 1 sketches a round over `degree` links, on exponential-256 at
least 255 / 15 = 17 sketches, 139 KB, per message on average).
Defaults per topology (lambda, lag, every; worst peer's error near consensus ~ lambda^lag):
    ring-8 (0.805, 22, 6), exponential-16 (0.5, 7, 2), exponential-64 (0.667, 12, 3),
    exponential-256 (0.75, 17, 5), torus-256 (0.970, 64 capped, 16), ring-256 (0.9998, 64 capped, 16).
Slow graphs: for lambda close to 1 no estimator can converge within its diameter: torus-256
(lambda 0.970) would need lag 149, ring-256 (lambda 0.9998) about 23,000, and both are capped at
64.  The estimate is then a *lagging and biased-low* one: (1 - mu^t)^2 is near 0 for the slow
modes mu of W, so mean e(t) only counts the disagreement in modes with mu^t small, i.e. roughly the
disagreement between peers within ~sqrt(t) hops on a ring (`python bench/estimator.py` measures
how low it reads; docs/benchmarks.md).  Use it as a trend of local disagreement, not as Xi; keep
flooding (`SketchBook`) where n is small enough, or raise max_lag.

Faults.  A live neighbour whose round-rnd payload did not arrive, or a down one, gets weight 0 in
that step (its weight moves to the self weight), as the model gossip does.  When only one end of an
edge used the other's value, W is no longer doubly stochastic for that step: the network means of
v and y drift and the estimate is biased, more so the more messages are lost; it is still produced
on time (`python bench/estimator.py` measures the bias under faults; docs/benchmarks.md).  A round
whose `mix` is skipped is an identity step.
Instances are matched by key [sketch round, step]; an instance a receiver does not hold (it joined
late, or missed `add_own`) is ignored, and a peer that missed `add_own(r)` simply produces no
estimate for r (`complete(r)` then turns true once r is past).  Other alternatives, not used:
Chebyshev / shift-register acceleration (Cao, Spielman & Yeh 2006, "Accelerated gossip
algorithms") reaches rate ~1 - sqrt(1 - lambda) but needs spectral bounds and exact participation
(a lost message breaks its polynomial); push-sum (Kempe, Dobra & Gehrke 2003) is needed only for
directed graphs.

Input hardening.  `receive` validates sender (a neighbour), round (within WINDOW of this peer's
round; payloads of rounds already mixed are late and dropped silently), keys (a list of distinct
[int, int] pairs naming instances that are in flight at that round: r % every == 0,
0 <= rnd - r < lag, step == rnd - r) and data (a strided, finite float64 tensor of shape
(len(keys), k + 1)); anything else raises EstimatorError naming the field and value.  A neighbour
keeps at most 2 * WINDOW + 1 rounds buffered, so the receive buffer never exceeds
    degree * (2 * WINDOW + 1) * max_in_flight * (k + 1) * 8 bytes      (`buffer_bound_bytes`),
e.g. 16 * 7 * 4 * 1025 * 8 = 3.7 MB on exponential-256 at k = 1024 (typically only 1-2 rounds per
neighbour are held).  Own state is max_in_flight * (2k + 2) float64; the ready queue keeps at most
READY_KEEP results.  Finite but huge values from a Byzantine neighbour are not detected: this is an
averaging protocol (see `robust` for the model side).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from p2pfl.errors import P2pflError

WINDOW = 3  # rounds a neighbour's message may be ahead of / behind this peer's round
READY_KEEP = 256  # finished estimates kept until `ready()` collects them


class EstimatorError(P2pflError, ValueError):
    """A malformed payload from a neighbour: the message names the field and value."""


@dataclass(frozen=True)
class EstimatorConfig:
    k: int  # sketch rows
    lag: int  # rounds an instance is gossiped before its estimate is read
    every: int  # a new instance starts on sketch rounds r with r % every == 0

    def __post_init__(self) -> None:
        for name in ("k", "lag", "every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EstimatorConfig.{name}: need an int >= 1, got {v!r}")

    @property
    def max_in_flight(self) -> int:
        """Instances alive at once: rounds r in (rnd - lag, rnd] with r % every == 0."""
        return math.ceil(self.lag / self.every)

    @property
    def max_payload_bytes(self) -> int:
        return self.max_in_flight * (self.k + 1) * 8

    @staticmethod
    def for_topology(
        k: int, lam: float, target: float = 0.01, max_lag: int = 64, in_flight: int = 4
    ) -> EstimatorConfig:
        """lag = smallest L >= 2 with lam^L <= target (capped at max_lag); every = ceil(lag / in_flight)."""
        if not (isinstance(lam, int | float) and 0.0 <= lam <= 1.0 + 1e-12):
            raise ValueError(f"for_topology: lam must be in [0, 1], got {lam!r}")
        if not 0.0 < target < 1.0:
            raise ValueError(f"for_topology: target must be in (0, 1), got {target!r}")
        if max_lag < 2 or in_flight < 1:
            raise ValueError(
                f"for_topology: need max_lag >= 2 and in_flight >= 1, got {max_lag}, {in_flight}"
            )
        lag = lag_for(lam, target, max_lag)
        return EstimatorConfig(k=k, lag=lag, every=math.ceil(lag / in_flight))


ROW_KEY_BYTES = 8  # a row's [origin, round] key in the message's info, about (msgpack)
MIN_FLOOD_ROWS = 128  # rows a flooded sketch keeps for estimates more often: about 4 % rms off the exact distance (docs/wan.md)
MIN_ROWS = 16  # rows a sketch keeps whatever the budget


def flood_plan(deliveries: int, messages: int, diameter: int, k: int, budget: float, rounds: int,
               block_bytes: int = 0) -> tuple[int, int]:
    """(rows, every): the sketch rows and the rounds between flooded sketch rounds, so that a run's
    messages carry, on average, at most `budget` bytes of sketches. A sketch round's `deliveries`
    rows (all origins, `node.build.flood_deliveries`) ride on the `messages` messages of each
    round it spreads over (at most `diameter`), each of which then also carries the block's
    descriptor (`block_bytes`). Rows are halved, down to MIN_FLOOD_ROWS, while the floods would
    be further apart than a flood takes to land (diameter + 1 rounds): estimates more often rather
    than more exact ones; and down to MIN_ROWS while the one flood a run always gets would not fit. A run of `rounds` rounds floods on round `rounds` (its last record's
    estimate) and every `every` rounds before it, floor((rounds - 1) / every) + 1 times in all,
    at least once, so short runs spread them over the whole run."""
    if deliveries < 1 or messages < 1 or budget <= 0:
        return k, 1

    def per_flood(rows: int) -> float:
        return deliveries * (8 * rows + ROW_KEY_BYTES) / messages + max(1, diameter) * block_bytes

    while k // 2 >= MIN_FLOOD_ROWS and per_flood(k) > (diameter + 1) * budget:
        k //= 2
    while k // 2 >= MIN_ROWS and per_flood(k) > max(1, rounds) * budget:  # not even the one flood fits
        k //= 2
    if rounds < 1:
        return k, max(1, math.ceil(per_flood(k) / budget))
    floods = max(1, math.floor(rounds * budget / per_flood(k)))  # the last round's and every `every` before it
    return k, math.ceil(rounds / floods)


def gossip_within(cfg: EstimatorConfig, budget: float) -> EstimatorConfig:
    """The gossip estimator's settings with at most `budget` bytes of payload per message: fewer
    instances in flight (an estimate every `lag` rounds at the least), then fewer sketch rows
    (at least MIN_ROWS)."""
    if budget <= 0 or cfg.max_payload_bytes <= budget:
        return cfg
    k = max(MIN_ROWS, min(cfg.k, int(budget // 8) - 1))
    in_flight = max(1, int(budget // ((k + 1) * 8)))
    return EstimatorConfig(k=k, lag=cfg.lag, every=max(cfg.every, math.ceil(cfg.lag / in_flight)))


def lag_for(lam: float, target: float, max_lag: int = 64) -> int:
    if lam <= 0.0:
        return 2
    if lam >= 1.0:
        return max_lag
    lag = math.ceil(math.log(target) / math.log(lam) - 1e-9)
    return max(2, min(max_lag, lag))


def error_bound(lam: float, t: int, n: int, spread_ratio: float) -> float:
    """Worst-case |Xi_i / Xi_hat - 1| after t steps (module docstring), spread_ratio = max_i ||s_i - s_bar|| / Xi_hat."""
    if t <= 0 or lam >= 1.0:
        return float("inf")
    track = 4 * (1 + lam) * t * lam ** (t - 1) * math.sqrt(n) * spread_ratio
    return lam**t + track / (1 - lam**t)


class _Instance:
    __slots__ = ("e", "r", "s", "step", "z")

    def __init__(self, r: int, s: torch.Tensor) -> None:
        self.r = r
        self.s = s  # own sketch, (k,)
        self.z = torch.cat([s, s.new_zeros(1)])  # [v, y], (k + 1,)
        self.e = 0.0  # ||s - v||^2 at the current step
        self.step = 0  # mixing steps done


class GossipEstimator:
    def __init__(self, me: int, weights: dict[int, float], cfg: EstimatorConfig) -> None:
        """weights: this peer's Metropolis-Hastings weights of its neighbours (self excluded; self weight is 1 - sum)."""
        if not isinstance(cfg, EstimatorConfig):
            raise ValueError(f"GossipEstimator: cfg must be an EstimatorConfig, got {type(cfg).__name__}")
        w: dict[int, float] = {}
        for j, wj in dict(weights).items():
            if isinstance(j, bool) or not isinstance(j, int) or j == me:
                raise ValueError(
                    f"GossipEstimator: weights key {j!r} must be a neighbour id other than me={me}"
                )
            if not (isinstance(wj, int | float) and math.isfinite(wj) and wj >= 0.0):
                raise ValueError(
                    f"GossipEstimator: weight of neighbour {j} must be finite and >= 0, got {wj!r}"
                )
            w[j] = float(wj)
        if math.fsum(w.values()) > 1.0 + 1e-9:
            raise ValueError(f"GossipEstimator: neighbour weights sum to {math.fsum(w.values())} > 1")
        self.me, self.cfg, self.weights = me, cfg, w
        self._inst: dict[int, _Instance] = {}
        self._buf: dict[int, dict[int, tuple[dict[int, int], torch.Tensor]]] = {j: {} for j in w}
        self._ready: deque[tuple[int, float]] = deque(maxlen=READY_KEEP)
        self._cur: int | None = None  # this peer's round: max round of add_own / payload / mix
        self._mixed: int | None = None  # last round mixed
        self.late = 0  # neighbour payloads that arrived after their round was mixed (dropped)

    # ------------------------------------------------------------ rounds

    def starts(self, rnd: int) -> bool:
        return rnd >= 0 and rnd % self.cfg.every == 0

    def _enter(self, rnd: int, what: str) -> None:
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise ValueError(f"{what}: round must be an int >= 0, got {rnd!r}")
        if self._mixed is not None and rnd <= self._mixed:
            raise ValueError(f"{what}: round {rnd} was already mixed (last mixed {self._mixed})")
        if self._cur is None or rnd > self._cur:
            self._cur = rnd
            self._prune()
        self._catch_up(rnd)

    def _catch_up(self, rnd: int) -> None:
        """Identity steps for rounds whose mix was skipped, so every instance has step == rnd - r."""
        for r in sorted(self._inst):
            inst = self._inst[r]
            while inst.step < rnd - r and r in self._inst:
                inst.step += 1
                self._maybe_finish(inst)

    def _maybe_finish(self, inst: _Instance) -> None:
        if inst.step >= self.cfg.lag:
            y = float(inst.z[-1])
            self._ready.append((inst.r, math.sqrt(max(y, 0.0))))
            del self._inst[inst.r]

    def add_own(self, rnd: int, sketch: torch.Tensor) -> None:
        """This peer's sketch of sketch-round rnd (only when starts(rnd))."""
        self._enter(rnd, "add_own")
        if not self.starts(rnd):
            raise ValueError(f"add_own: round {rnd} starts no instance (every={self.cfg.every})")
        if rnd in self._inst:
            raise ValueError(f"add_own: instance of round {rnd} already started")
        if not isinstance(sketch, torch.Tensor) or sketch.shape != (self.cfg.k,):
            shape = tuple(sketch.shape) if isinstance(sketch, torch.Tensor) else type(sketch).__name__
            raise ValueError(f"add_own: sketch must be a tensor of shape ({self.cfg.k},), got {shape}")
        s = sketch.detach().to(device="cpu", dtype=torch.float64).clone()
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"add_own: sketch of round {rnd} has non-finite values")
        self._inst[rnd] = _Instance(rnd, s)

    def payload(self, rnd: int) -> tuple[list[list[int]], torch.Tensor]:
        """(keys, data) for this peer's round-rnd message, the same for every neighbour."""
        self._enter(rnd, "payload")
        rs = sorted(r for r in self._inst if r <= rnd)
        keys = [[r, self._inst[r].step] for r in rs]
        if not rs:
            return [], torch.zeros((0, self.cfg.k + 1), dtype=torch.float64)
        return keys, torch.stack([self._inst[r].z for r in rs])

    # ------------------------------------------------------------ receiving

    def _check_keys(self, rnd: int, keys: object) -> dict[int, int]:
        if not isinstance(keys, list):
            raise EstimatorError(f"keys: expected a list of [round, step] pairs, got {type(keys).__name__}")
        if len(keys) > self.cfg.max_in_flight:
            raise EstimatorError(
                f"keys: {len(keys)} instances, at most {self.cfg.max_in_flight} can be in flight"
            )
        rows: dict[int, int] = {}
        every, lag = self.cfg.every, self.cfg.lag
        for idx, key in enumerate(keys):
            # `type(..) is int` rejects bool (and other int subclasses) as well as floats and strings
            if not (
                type(key) in (list, tuple) and len(key) == 2 and type(key[0]) is int and type(key[1]) is int
            ):
                raise EstimatorError(f"keys[{idx}]: expected an [int, int] pair, got {key!r}")
            r, step = key
            if not (r >= 0 and r % every == 0 and 0 <= rnd - r < lag):
                raise EstimatorError(
                    f"keys[{idx}]: instance round {r} is not in flight at round {rnd} "
                    f"(every={self.cfg.every}, lag={self.cfg.lag})"
                )
            if step != rnd - r:
                raise EstimatorError(
                    f"keys[{idx}]: step {step} of instance {r} does not match round {rnd} (expected {rnd - r})"
                )
            if r in rows:
                raise EstimatorError(f"keys[{idx}]: duplicate instance round {r}")
            rows[r] = idx
        return rows

    def receive(self, sender: int, rnd: int, keys: object, data: object) -> None:
        """A neighbour's payload of its round-rnd message; raises EstimatorError naming the problem."""
        if type(sender) is not int or sender not in self.weights:
            raise EstimatorError(f"sender: {sender!r} is not a neighbour of peer {self.me}")
        if type(rnd) is not int or rnd < 0:
            raise EstimatorError(f"rnd: expected an int >= 0, got {rnd!r}")
        if self._cur is not None and abs(rnd - self._cur) > WINDOW:
            raise EstimatorError(
                f"rnd: round {rnd} from peer {sender} is more than {WINDOW} rounds from this peer's round {self._cur}"
            )
        rows = self._check_keys(rnd, keys)
        if not isinstance(data, torch.Tensor):
            raise EstimatorError(f"data: expected a float64 tensor, got {type(data).__name__}")
        if data.layout != torch.strided or data.dtype != torch.float64:
            raise EstimatorError(f"data: expected a dense float64 tensor, got {data.dtype} ({data.layout})")
        want = (len(rows), self.cfg.k + 1)
        if tuple(data.shape) != want:
            raise EstimatorError(f"data: expected shape {want}, got {tuple(data.shape)}")
        # A sum is finite only if every element is (inf/nan propagate); only an overflowing sum of
        # finite values needs the elementwise check.
        if data.numel() and not math.isfinite(float(data.sum())) and not bool(torch.isfinite(data).all()):
            raise EstimatorError(f"data: non-finite values in payload of round {rnd} from peer {sender}")
        if self._mixed is not None and rnd <= self._mixed:
            self.late += 1  # honest but too late: that round's step is done
            return
        buf = self._buf[sender]
        if rnd not in buf and len(buf) >= 2 * WINDOW + 1:  # only reachable before this peer's first round
            raise EstimatorError(
                f"rnd: peer {sender} already has {len(buf)} rounds buffered; round {rnd} refused"
            )
        buf[rnd] = (rows, data.detach().clone() if data.device.type == "cpu" else data.detach().cpu())

    def _prune(self) -> None:
        lo = self._cur - WINDOW if self._cur is not None else 0
        if self._mixed is not None:
            lo = max(lo, self._mixed + 1)
        hi = self._cur + WINDOW if self._cur is not None else None
        for buf in self._buf.values():
            for q in [q for q in buf if q < lo or (hi is not None and q > hi)]:
                del buf[q]

    # ------------------------------------------------------------ mixing

    def mix(self, rnd: int, live: Iterable[int]) -> None:
        """Round rnd is over: one averaging step of every in-flight instance (missing/down neighbours: weight to self)."""
        self._enter(rnd, "mix")
        live_set = set(live)
        rs = [r for r in sorted(self._inst) if r <= rnd]
        if rs:
            z = torch.stack([self._inst[r].z for r in rs])  # (m, k + 1): [v, y] per instance
            acc = torch.zeros_like(z)
            w_self = torch.ones(len(rs), dtype=torch.float64)
            for j, wj in self.weights.items():
                entry = self._buf[j].get(rnd) if j in live_set else None
                if entry is None or wj == 0.0:
                    continue  # down, or its payload did not arrive: its weight stays with self
                rowmap, data = entry
                if list(rowmap) == rs:  # the common case: the same instances in the same order
                    acc.add_(data, alpha=wj)
                    w_self -= wj
                    continue
                for a, r in enumerate(rs):
                    b = rowmap.get(r)
                    if b is not None:  # an instance the neighbour does not hold is skipped
                        acc[a].add_(data[b], alpha=wj)
                        w_self[a] -= wj
            acc.addcmul_(w_self[:, None], z)
            s_own = torch.stack([self._inst[r].s for r in rs])
            e_new = ((s_own - acc[:, :-1]) ** 2).sum(1)
            e_old = torch.tensor([self._inst[r].e for r in rs], dtype=torch.float64)
            acc[:, -1] += e_new - e_old
            for a, r in enumerate(rs):
                inst = self._inst[r]
                inst.z, inst.e = acc[a], float(e_new[a])
                inst.step += 1
                self._maybe_finish(inst)
        self._mixed = rnd
        self._prune()

    def ready(self) -> list[tuple[int, float]]:
        """(sketch round, estimate of Xi) of instances finished since the last call; each once."""
        out = list(self._ready)
        self._ready.clear()
        return out

    def complete(self, rnd: int) -> bool:
        """True once nothing more will come for rnd: its estimate was produced, or rnd starts no
        instance, or it is past and this peer never started it (no add_own)."""
        if not self.starts(rnd):
            return True
        if rnd in self._inst:
            return False
        return self._mixed is not None and rnd <= self._mixed

    # ------------------------------------------------------------ introspection (tests, reports)

    def in_flight(self) -> list[int]:
        return sorted(self._inst)

    def instance_state(self, r: int) -> tuple[torch.Tensor, float, float]:
        """(v, y, e) of in-flight instance r (copies)."""
        inst = self._inst[r]
        return inst.z[:-1].clone(), float(inst.z[-1]), inst.e

    def buffered_rounds(self) -> int:
        return sum(len(b) for b in self._buf.values())

    def buffered_bytes(self) -> int:
        return sum(d.numel() * 8 for b in self._buf.values() for _, d in b.values())

    def buffer_bound_bytes(self) -> int:
        return len(self.weights) * (2 * WINDOW + 1) * self.cfg.max_payload_bytes

