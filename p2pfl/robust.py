"""Robust aggregation for the mixing step, and a guard against implausible update norms.

Plain gossip gives a neighbour weight w_ij over our model, so one peer that sends scaled or random
states moves all its neighbours arbitrarily far. The options trade exactness for bounded
influence (all are off by default, because none of them preserves the network mean exactly):

- ``clip[:TAU]`` -- self-centred clipping (He, Karimireddy, Jaggi, "Byzantine-robust decentralized
  learning via ClippedGossip", 2022): x_i += gamma * sum_j w_ij clip(xhat_j - xhat_i, TAU). A bad
  neighbour moves us by at most w_ij * TAU per round. Without TAU it is chosen each round as the
  lower median of the neighbours' distances, so a minority of outliers cannot raise it. Keeps
  the MH weights; with honest peers only, it slows consensus while distances exceed TAU.
- ``trimmed:B`` -- coordinate-wise trimmed mean of {xhat_i} and the neighbours' xhat_j, dropping
  the B largest and B smallest values per coordinate (Yin et al., ICML 2018, here per
  neighbourhood); x_i moves by gamma * (1 - w_ii) towards it. Tolerates B bad neighbours;
  needs degree >= 2B.
- ``median`` -- coordinate-wise median of the same set; the most robust, the slowest.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


class RobustError(ValueError):
    """A robust-aggregation spec that cannot be used."""


@dataclass(frozen=True)
class RobustSpec:
    kind: str  # "off", "clip", "trimmed", "median"
    tau: float | None = None
    trim: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> RobustSpec:
        if spec in (None, "", "off", "none"):
            return cls("off")
        name, _, arg = str(spec).partition(":")
        try:
            if name == "clip":
                tau = float(arg) if arg else None
                if tau is not None and not (tau > 0 and math.isfinite(tau)):
                    raise RobustError(f"robust: clip threshold must be positive, got {arg!r}")
                return cls("clip", tau=tau)
            if name == "trimmed":
                b = int(arg or 1)
                if b < 1:
                    raise RobustError(f"robust: trimmed needs B >= 1, got {arg!r}")
                return cls("trimmed", trim=b)
            if name == "median" and not arg:
                return cls("median")
        except ValueError as e:
            if isinstance(e, RobustError):
                raise
            raise RobustError(f"robust: bad number in {spec!r}") from None
        raise RobustError(f"robust: unknown spec {spec!r}; use off, clip[:TAU], trimmed:B or median")


def _dist(a: State, b: State) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def robust_step(spec: RobustSpec, x: State, xhat_i: State, xhats: Sequence[State], weights: Sequence[float], gamma: float) -> None:
    """Apply one robust mixing step to x in place (xhats/weights: the neighbours used this round)."""
    if not xhats:
        return
    if spec.kind == "clip":
        dists = [_dist(xj, xhat_i) for xj in xhats]
        tau = spec.tau if spec.tau is not None else sorted(dists)[(len(dists) - 1) // 2]
        for xj, w, d in zip(xhats, weights, dists, strict=True):
            scale = w * (min(1.0, tau / d) if d > 0 else 1.0)
            for k in x:
                x[k] += gamma * scale * (xj[k] - xhat_i[k])
        return
    total = float(sum(weights))
    for k in x:
        stack = torch.stack([xhat_i[k], *[xj[k] for xj in xhats]])
        if spec.kind == "median":
            agg = stack.median(dim=0).values
        else:
            m = stack.shape[0]
            b = min(spec.trim, (m - 1) // 2)
            agg = stack.sort(dim=0).values[b : m - b].mean(dim=0)
        x[k] += gamma * total * (agg - xhat_i[k])


class NormGuard:
    """Flags updates whose norm is far outside the recent range of accepted ones.

    The reference is the median of the last `window` accepted norms over all neighbours (one
    sender cannot steer it alone); nothing is judged before `warmup` norms were seen.
    """

    def __init__(self, factor: float = 100.0, window: int = 32, warmup: int = 4) -> None:
        self.factor, self.warmup = factor, warmup
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, norm: float) -> str | None:
        if self.factor > 0 and len(self.recent) >= self.warmup:
            ref = sorted(self.recent)[len(self.recent) // 2]
            if ref > 0 and norm > self.factor * ref:
                return f"update norm {norm:.3g} is over {self.factor:g}x the recent median {ref:.3g}"
        self.recent.append(norm)
        return None


Attack = Callable[[State, int, list[State]], State]  # (own model, round, neighbours' public copies) -> model to gossip


def parse_byzantine(spec: str | None) -> Attack | None:
    """A model-poisoning fault for robustness experiments: the peer gossips a corrupted model.

    scale:F multiplies its model by F every round (an exploding sender); noise:S adds Gaussian
    noise of standard deviation S (a random sender)."""
    if spec in ("", "off", None):
        return None
    name, _, arg = str(spec).partition(":")
    try:
        value = float(arg)
    except ValueError:
        raise RobustError(f"--byzantine: expected scale:F or noise:S, got {spec!r}") from None
    if name == "scale":
        return lambda x, rnd, seen: {k: v * value for k, v in x.items()}
    if name == "noise":
        def noisy(x: State, rnd: int, seen: list[State]) -> State:
            g = torch.Generator().manual_seed(rnd)
            return {k: v + value * torch.randn(v.shape, generator=g) for k, v in x.items()}
        return noisy
    raise RobustError(f"--byzantine: expected scale:F or noise:S, got {spec!r}")
