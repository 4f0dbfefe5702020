"""Robust aggregation for the mixing step, and a guard against implausible update norms.

Plain gossip gives a neighbour weight w_ij over our model, so one peer that sends scaled or random
states moves all its neighbours arbitrarily far. The options trade exactness for bounded
influence (all are off by default, because none of them preserves the network mean exactly):

- ``clip[:TAU]`` -- self-centred clipping, the aggregation rule of ClippedGossip (He, Karimireddy,
  Jaggi, "Byzantine-robust decentralized learning via ClippedGossip", 2022):
  x_i += gamma * sum_j w_ij clip(xhat_j - xhat_i, TAU), clip(z, t) = min(1, t / ||z||) z. A bad
  neighbour moves us by at most gamma * w_ij * TAU per round. Keeps the MH weights; with honest
  peers only, it slows consensus while distances exceed TAU. It is ClippedGossip's update with two
  differences. The centre is our public copy xhat_i, not the local model x_i: with the exact
  codec (gamma = 1) the two are equal when we mix, so a fixed TAU gives the paper's update
  exactly; with a lossy codec it clips CHOCO's replica differences. Without TAU, the radius is
  chosen each round as the lower median of the neighbours' distances, so a minority of outliers
  cannot raise it; the paper's analysis instead takes TAU from the honest neighbours' distances
  and the Byzantine share of the weight (which a peer does not know), and the authors' released
  code from the second-largest distance (only the farthest neighbour is clipped). Ours clips the
  farther half of the neighbours every round (the same as theirs at degree 2): more robust to
  several bad neighbours, slower between honest ones.
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
from statistics import NormalDist

import torch

from p2pfl.core.specs import ByzantineSpec, RobustError, RobustSpec

State = dict[str, torch.Tensor]


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


# ------------------------------------------------------------- fault injection (experiments only)
#
# `--byzantine SPEC` makes a peer misbehave so that the options above can be measured
# (docs/attacks.md). Model-poisoning attacks replace, just before each round's delta, the model the
# peer gossips; an attack that needs the honest peers' models sees what the peer holds anyway,
# its live, synced neighbours' public copies xhat_j (one round old: their current round has not
# arrived yet). The updates of crafted attacks are taken relative to one reference, the attacker's
# own public copy r = xhat_i, i.e. what its neighbours hold of it: an honest peer's update is
# x_i - r, a neighbour's is xhat_j - r.

Attack = Callable[[State, State, int, list[State]], State]
"""(own model x_i after this round's local steps, own public copy xhat_i, round, the live synced
neighbours' public copies xhat_j) -> the model to gossip this round (it replaces x_i)."""


def scaled(x: State, factor: float) -> State:
    """F x: an exploding sender (the peer keeps the scaled model, so |F| > 1 grows geometrically)."""
    return {k: v * factor for k, v in x.items()}


def noised(x: State, std: float, rnd: int) -> State:
    """x + S N(0, I), seeded by the round: a random sender."""
    g = torch.Generator().manual_seed(rnd)
    return {k: v + std * torch.randn(v.shape, generator=g) for k, v in x.items()}


def sign_flipped(x: State, public: State, factor: float) -> State:
    """r - F (x - r): the peer's honest update since its last delta, negated and scaled by F, sent
    from where its neighbours already hold it (the sign-flipping attack on stochastic gradients,
    Li et al., "RSA", AAAI 2019, moved to gossiped models: what is flipped is the model's update)."""
    return {k: public[k] - factor * (v - public[k]) for k, v in x.items()}


def alie_z(n: int, f: int) -> float:
    """z_max of "A little is enough" (Baruch, Baruch & Goldberg, NeurIPS 2019) for n workers of which
    f are Byzantine: s = floor(n/2 + 1) - f honest "supporters" are needed, and z is the largest
    value with Phi(z) < (n - s)/n, i.e. Phi^-1((n - s)/n) (Phi the standard normal CDF).

    Needs 1 <= f <= n // 2 (else s < 1 and no z works). The ClippedGossip authors' released code
    uses (n - f - s)/(n - f) instead, a smaller z; give z explicitly to use another value."""
    if not 1 <= f <= n // 2:
        raise RobustError(f"--byzantine alie: needs 1 <= f <= n // 2 Byzantine workers, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - s) / n)


def little_is_enough(honest: list[State], z: float) -> State:
    """mu - z sigma per coordinate, mu and sigma the mean and population standard deviation of the
    honest neighbours' public copies: a model inside the honest spread (for small z), so neither
    distances nor per-coordinate order single it out, shifted the same way every round."""
    out = {}
    for k in honest[0]:
        stack = torch.stack([h[k] for h in honest])
        out[k] = stack.mean(0) - z * stack.std(0, correction=0)
    return out


def inner_product(public: State, honest: list[State], eps: float) -> State:
    """r - eps * mean_j (xhat_j - r): the mean of the honest neighbours' updates relative to the
    attacker's public copy, negated and scaled (inner-product manipulation, Xie, Koyejo & Gupta,
    UAI 2020), so the aggregate a neighbour forms has a smaller, for large eps negative, inner
    product with the honest direction."""
    out = {}
    for k, r in public.items():
        mean = torch.stack([h[k] for h in honest]).mean(0)
        out[k] = r - eps * (mean - r)
    return out


def _scale(f: float | None) -> Attack:
    assert f is not None
    return lambda x, public, rnd, honest: scaled(x, f)


def _noise(s: float | None) -> Attack:
    assert s is not None
    return lambda x, public, rnd, honest: noised(x, s, rnd)


def _signflip(f: float | None) -> Attack:
    factor = 1.0 if f is None else f
    return lambda x, public, rnd, honest: sign_flipped(x, public, factor)


def _alie(z: float | None) -> Attack:
    # Default z: the peer's neighbourhood (its honest neighbours and itself) with itself Byzantine.
    return lambda x, public, rnd, honest: (
        little_is_enough(honest, alie_z(len(honest) + 1, 1) if z is None else z) if honest else x)


def _ipm(eps: float | None) -> Attack:
    e = 0.1 if eps is None else eps  # the epsilon of the ClippedGossip authors' decentralized IPM
    return lambda x, public, rnd, honest: inner_product(public, honest, e) if honest else x


# the model-poisoning attacks of `p2pfl.core.specs.ATTACKS` (the others poison the data or the protocol)
_BUILDERS: dict[str, Callable[[float | None], Attack]] = {
    "scale": _scale, "noise": _noise, "signflip": _signflip, "alie": _alie, "ipm": _ipm}


def parse_byzantine(spec: str | None) -> Attack | None:
    """The model-poisoning attack of a `--byzantine` spec; None when the peer's model travels
    honestly (off; labelflip, whose attack is in the data, see `flips_labels`; abuse, whose attack
    is in the protocol fields, see `p2pfl.core.abuse`).

    scale:F gossips F x; noise:S gossips x + S N(0, I); signflip[:F] gossips r - F (x - r);
    alie[:Z] gossips mu - Z sigma of the honest copies; ipm[:EPS] gossips r - EPS mean_j (xhat_j - r)
    (r: the peer's own public copy; definitions and references at each function above)."""
    s = ByzantineSpec.parse(spec)
    build = _BUILDERS.get(s.name)
    return build(s.value) if build is not None else None


def flips_labels(spec: str | None) -> bool:
    """Whether the spec poisons the peer's data: with labelflip its trainer learns label C-1-y for an
    image of class y (of C classes) while it gossips honestly (label flipping, Tolpegin et al.,
    "Data poisoning attacks against federated learning systems", ESORICS 2020)."""
    return ByzantineSpec.parse(spec).name == "labelflip"
