"""Error and lag of the gossip consensus estimator (`p2pfl.core.estimate`) per topology, and under faults.

usage: .venv/bin/python bench/estimator.py   (prints a table; about 10 s)
"""

from __future__ import annotations

import math

import torch

from p2pfl.core.estimate import EstimatorConfig
from p2pfl.sim.engines import run_estimators


def main() -> None:
    import numpy as np

    from p2pfl.core import consensus, topology

    k, dim = 1024, 4096
    print(
        f"k={k}, dim={dim}; states x = W^T0 x0 (near consensus, T0 with lambda^T0 ~ 1e-3), one instance at round 0"
    )
    print(
        "topology         lambda  lag every  lam^lag  worst|est/Xi_hat-1|  worst|est/Xi-1|  |Xi_hat/Xi-1|  max bytes/msg"
    )
    for kind, n in (
        ("ring", 8),
        ("exponential", 16),
        ("exponential", 64),
        ("exponential", 256),
        ("torus", 256),
        ("ring", 256),
    ):
        topo = topology.generate(kind, n)
        lam = topo.mixing_lambda()
        cfg = EstimatorConfig.for_topology(k, lam)
        t0 = min(200, max(1, math.ceil(math.log(1e-3) / math.log(lam))))
        x = torch.tensor(np.linalg.matrix_power(topo.mixing_matrix(), t0)) @ (
            torch.randn(n, dim, generator=torch.Generator().manual_seed(n), dtype=torch.float64) + 1.0
        )
        sk = consensus.Sketcher(dim, k, seed=7)
        s = {i: sk(x[i]) for i in topo.ids}
        xi_hat = consensus.sketch_distance(s.values())
        xi = float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt())
        one = EstimatorConfig(k=k, lag=cfg.lag, every=cfg.lag + 1)  # a single instance: same numbers, faster
        res, _ = run_estimators({i: topo.mh_weights(i) for i in topo.ids}, one, lambda i, r, s=s: s[i], cfg.lag)
        est = [v for i in topo.ids for r, v in res[i] if r == 0]
        e_hat = max(abs(v / xi_hat - 1) for v in est)
        e_x = max(abs(v / xi - 1) for v in est)
        print(
            f"{topo.name:15s} {lam:7.4f} {cfg.lag:4d} {cfg.every:5d} {lam**cfg.lag:8.2e} {e_hat:20.4f} {e_x:16.4f} "
            f"{abs(xi_hat / xi - 1):14.4f} {cfg.max_payload_bytes:10d}"
        )

    import random

    print(
        "faults on exponential-16, default config (lag 7), k=256, near consensus; worst live peer |est/Xi_hat-1| for round 0"
    )
    topo = topology.generate("exponential", 16)
    lam = topo.mixing_lambda()
    cfg = EstimatorConfig.for_topology(256, lam)
    t0 = math.ceil(math.log(1e-3) / math.log(lam))
    x = torch.tensor(np.linalg.matrix_power(topo.mixing_matrix(), t0)) @ (
        torch.randn(16, 1024, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1.0
    )
    sk = consensus.Sketcher(1024, 256, 1)
    s = {i: sk(x[i]) for i in topo.ids}
    xi_hat = consensus.sketch_distance(s.values())
    rng = random.Random(0)
    for name, kw in (
        ("none", {}),
        ("peer 3 down from round 2", {"down": lambda i, r: i == 3 and r >= 2}),
        ("10% of messages lost", {"drop": lambda a, b, r: rng.random() < 0.1}),
        ("30% of messages lost", {"drop": lambda a, b, r: rng.random() < 0.3}),
        ("peer 3 down rounds 2-5", {"down": lambda i, r: i == 3 and 2 <= r < 6}),
    ):
        res, _ = run_estimators(
            {i: topo.mh_weights(i) for i in topo.ids}, cfg, lambda i, r: s[i], cfg.lag + 1, **kw
        )
        est = [v for i in topo.ids for r, v in res[i] if r == 0]
        print(
            f"  {name:26s} peers with an estimate {len(est):2d}   worst error {max(abs(v / xi_hat - 1) for v in est):.4f}"
        )


if __name__ == "__main__":
    main()
