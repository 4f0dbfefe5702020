"""Open membership in process (`"setting": "sim"`): HyParView views of 256 peers on a virtual clock
(`p2pfl.sim.overlay`, one round = one second, every view message msgpack-encoded and counted),
all joining through peer 0 within the first second.

Per seed:
- `rounds_to_all_mixing`: rounds until every peer holds a link and the overlay (links both ends
  hold) is connected; `rounds_to_full_views`: until every peer holds at least active - 1 links.
- `contraction_vs_static`: exact averaging x <- W x with Metropolis-Hastings weights on each
  round's overlay, against a static random regular graph of degree `active` from the same start,
  over the same rounds: the ratio of contractions, -log of the per-round factor of the consensus
  distance (geometric mean over the rounds).
- `churn_contraction_vs_static`: the same while 10 % of the peers churn every 10 rounds (each
  round a tenth of them: half leave with a goodbye, half crash and are found after the liveness
  timeout; as many new peers join through a random live peer and start from a neighbour's value).
  `churn_rounds_connected`: share of those rounds in which the peers holding a link form one
  component; `churn_isolated_mean`: live peers holding no link, per round;
  `churn_rounds_to_first_link_max`: the longest a joiner waited for its first link.
- `attacker_view_share` against `attacker_population_share`: a fresh run where 10 % of the
  identities push their own ids (every round, to every honest neighbour: a shuffle ending there
  and a walk end full of attacker ids, and a high-priority NEIGHBOR to an honest peer; their
  shuffle samples hold attackers only; they accept every link): the mean share of an honest
  peer's active view they hold over the last 20 of 60 rounds; `honest_connected`: whether the
  honest peers' links alone still connect them. `attacker_view_share_hubs`: the same attackers
  also accepting 4 x the links an honest peer holds (a peer's own degree is not checked by others).
- `membership_bytes_per_peer_round`: encoded view-message bytes per live peer per round once the
  overlay has formed (and during the joins), and with ``--delta`` (default) the bytes of one
  delta of the default codec `sign:2048` on the default model's adapter times the mean degree:
  `membership_bytes_share` is their ratio.

`lambda_overlay` and `lambda_static`: ||W - 11^T/n||_2 of the overlay at round 70 and of the
static graph (-ln lambda is the asymptotic contraction per round).

With ``--processes P`` (`"setting": "daemon"`), the first keys come from real peers instead:
`--peers` co-hosted in P processes over loopback TCP with CURVE and admission certificates, all
knowing only peer 0's address (`scripts/launch.sh --open`'s network), `--no-train` exact gossip
of `--dim` floats at `--round-period`, against the same peers on a static random regular graph
of degree `active` (a topology file, the same settings) in the same run:
`rounds_to_all_mixing` (the first round every peer mixes with a neighbour and the links both
ends hold connect them), `membership_bytes_per_peer_round` (the records' `view_bytes`, view and
revocation messages as framed, per peer per round over the second half) and its share of the
default codec's deltas, `contraction_vs_static` (-log of the per-round factor of the exact
consensus distance between the checkpoint of mid-run (round 29 of 60) and the final models, open
over static). Churn and attackers stay in the simulator (keys `churn_*`, `attacker_*`).

usage: python bench/membership.py [--peers 256] [--seeds 0,1,2] [--payload 160] [--no-delta]
                                  [--rewires 4] [--processes 4 [--rounds 60] [--dim 256] [--round-period 0.5]]
"""

from __future__ import annotations

import argparse
import math
import random

import networkx as nx
import numpy as np
from common import emit

from p2pfl.core.membership.messages import ViewConfig
from p2pfl.core.membership.views import mh_weights
from p2pfl.sim.overlay import Overlay

JOIN_ROUNDS, MIX_ROUNDS, CHURN_ROUNDS, ATTACK_ROUNDS, DIM = 40, 30, 50, 60, 16


def mix_factor(graph: dict[int, set[int]], x: dict[int, np.ndarray]) -> float:
    """One exact gossip round on `graph` in place; the consensus distance after over before."""
    ids = sorted(graph)
    before = np.stack([x[p] for p in ids])
    new = {p: sum(w * x[q] for q, w in mh_weights(len(graph[p]), {q: len(graph[q]) for q in graph[p]}, p).items())
           for p in ids}
    x.update(new)
    after = np.stack([x[p] for p in ids])
    return float(np.linalg.norm(after - after.mean(0)) / np.linalg.norm(before - before.mean(0)))


def contraction(factors: list[float]) -> float:
    return -float(np.mean(np.log(factors)))


def mixing_lambda(graph: dict[int, set[int]]) -> float:
    """||W - 11^T/n||_2 of the Metropolis-Hastings matrix of `graph` (its asymptotic contraction)."""
    ids = sorted(graph)
    index = {p: i for i, p in enumerate(ids)}
    w = np.zeros((len(ids), len(ids)))
    for p in ids:
        for q, v in mh_weights(len(graph[p]), {q: len(graph[q]) for q in graph[p]}, p).items():
            w[index[p], index[q]] = v
    return float(np.sort(np.abs(np.linalg.eigvalsh(w)))[-2])


def static_run(n: int, degree: int, rounds: int, seed: int) -> tuple[float, float]:
    """Contraction per round over `rounds` and lambda of a random `degree`-regular graph."""
    g = nx.random_regular_graph(degree, n, seed=seed)
    graph = {p: set(g[p]) for p in g}
    rng = np.random.default_rng(seed)
    x = {p: rng.standard_normal(DIM) for p in graph}
    return contraction([mix_factor(graph, x) for _ in range(rounds)]), mixing_lambda(graph)


def joined(ov: Overlay, x: dict[int, np.ndarray]) -> dict[int, set[int]]:
    """The overlay among peers that mix: a new peer enters with the exact value of a neighbour
    once it has one; leavers are dropped."""
    g = ov.graph()
    for p in sorted(g):
        if p not in x and any(q in x for q in g[p]):
            x[p] = x[min(q for q in g[p] if q in x)].copy()
    for p in set(x) - set(g):
        del x[p]
    return {p: {q for q in g[p] if q in x} for p in g if p in x}


def run_seed(n: int, seed: int, cfg: ViewConfig, payload: int) -> dict:
    out: dict = {"seed": seed}
    ov = Overlay(cfg, seed, payload=payload)
    ov.start(0, 0.0, None)
    for p in range(1, n):
        ov.start(p, random.Random(seed * 7919 + p).random(), 0)
    mixing = full = None
    for r in range(1, JOIN_ROUNDS + 1):
        ov.run(float(r))
        g = ov.graph()
        degrees = [len(v) for v in g.values()]
        if mixing is None and min(degrees) >= 1 and nx.is_connected(nx.Graph(g)):
            mixing = r
        if full is None and min(degrees) >= cfg.active - 1:
            full = r
    out["rounds_to_all_mixing"], out["rounds_to_full_views"] = mixing, full
    out["join_bytes_per_peer_round"] = ov.bytes / (n * JOIN_ROUNDS)

    rng = np.random.default_rng(seed)
    x = {p: rng.standard_normal(DIM) for p in ov.graph()}
    b0, factors, degrees = ov.bytes, [], []
    for r in range(JOIN_ROUNDS + 1, JOIN_ROUNDS + MIX_ROUNDS + 1):
        ov.run(float(r))
        g = ov.graph()
        degrees += [len(v) for v in g.values()]
        factors.append(mix_factor(g, x))
    out["membership_bytes_per_peer_round"] = (ov.bytes - b0) / (n * MIX_ROUNDS)
    out["mean_degree"] = float(np.mean(degrees))
    static, out["lambda_static"] = static_run(n, cfg.active, MIX_ROUNDS, seed)
    out["lambda_overlay"] = mixing_lambda(g)  # the overlay at the end of the window
    out["contraction"], out["static_contraction"] = contraction(factors), static
    out["contraction_vs_static"] = contraction(factors) / static

    crng, nxt, factors, connected, isolated, degrees = random.Random(seed), n, [], 0, [], []
    started: dict[int, float] = {}
    waits: list[float] = []
    start = float(JOIN_ROUNDS + MIX_ROUNDS)
    per_round = n // 10 / 10  # 10 % of the peers per 10 rounds
    for i in range(CHURN_ROUNDS):
        t = start + i
        k = math.floor((i + 1) * per_round) - math.floor(i * per_round)
        gone = crng.sample(sorted(ov.live), k)
        for j, p in enumerate(gone):
            ov.stop(p, t + 0.5, crash=j % 2 == 1)
            ov.start(nxt, t + 0.5, crng.choice(sorted(ov.live - set(gone))))
            started[nxt] = t + 0.5
            nxt += 1
        ov.run(t + 1.0)
        g = joined(ov, x)
        full = ov.graph()
        for p in [p for p in started if full.get(p)]:
            waits.append(t + 1.0 - started.pop(p))
        isolated.append(sum(not v for v in full.values()))
        degrees += [len(v) for v in full.values()]
        connected += nx.is_connected(nx.Graph({p: v for p, v in full.items() if v}))
        factors.append(mix_factor(g, x))
    out["churn_contraction_vs_static"] = contraction(factors) / static
    out["churn_rounds_connected"] = connected / CHURN_ROUNDS  # among peers holding a link
    out["churn_isolated_mean"] = float(np.mean(isolated))  # live peers holding none (joiners, mostly)
    out["churn_mean_degree"] = float(np.mean(degrees))
    out["churn_rounds_to_first_link_max"] = max(waits) if waits else None
    out["churn_never_linked"] = len(started)
    return out


def run_attack(n: int, seed: int, cfg: ViewConfig, payload: int, hub: int = 1) -> dict:
    bad = set(random.Random(seed).sample(range(1, n), n // 10))
    ov = Overlay(cfg, seed, payload=payload, attackers=bad, hub=hub)
    ov.start(0, 0.0, None)
    for p in range(1, n):
        ov.start(p, random.Random(seed * 7919 + p).random(), 0)
    shares = []
    for r in range(1, ATTACK_ROUNDS + 1):
        ov.run(float(r))
        if r > ATTACK_ROUNDS - 20:
            g = ov.graph()
            shares.append(np.mean([len(g[p] & bad) / max(1, len(g[p])) for p in g if p not in bad]))
    g = ov.graph()
    honest = nx.Graph([(p, q) for p in g if p not in bad for q in g[p] if q not in bad])
    honest.add_nodes_from(p for p in g if p not in bad)
    return {"attacker_view_share": float(np.mean(shares)), "attacker_population_share": len(bad) / n,
            "honest_connected": nx.is_connected(honest), "refused": dict(ov.refused)}


def delta_bytes() -> int:
    """Bytes of one `sign:2048` delta of the default model's adapter (the codec's parts)."""
    import torch

    from p2pfl.config import TrainerConfig
    from p2pfl.core.codec import encoded_nbytes
    from p2pfl.core.compress import get_codec
    from p2pfl.learn.trainer import Trainer

    torch.set_num_threads(1)
    numel = sum(t.numel() for t in Trainer(TrainerConfig(), 0, 1).adapter_state().values())
    return encoded_nbytes(get_codec("sign:2048").encode(torch.randn(numel), seed=7))


def _models(run, peers: list[int], rnd: int | None) -> np.ndarray:
    """The peers' models at their checkpoint of round `rnd` (read while the run goes on: a peer
    keeps its last two), or their final adapters (None)."""
    from p2pfl.host.checkpoint import load_state, read

    xs = []
    for p in peers:
        if rnd is None:
            t = load_state(run / f"peer-{p}" / "adapter.safetensors")
            xs.append(np.concatenate([t[k].double().numpy().ravel() for k in sorted(t)]))
        else:
            c = read(run / f"peer-{p}" / f"checkpoint-{rnd:08d}.safetensors")
            xs.append(np.concatenate([c.tensors[k].double().numpy().ravel() for k in sorted(c.tensors) if k.startswith("x/")]))
    return np.stack(xs)


def _spread(x: np.ndarray) -> float:
    return float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))


def daemon_runs(n: int, processes: int, rounds: int, dim: int, period: float, seed: int) -> dict:
    """The open network and the static graph over real processes (module docstring)."""
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from p2pfl.core import topology as T
    from p2pfl.host.files import dump_topology, read_jsonl
    from p2pfl.net.ports import free_base_port
    from p2pfl.ops import open_launch as O
    from p2pfl.ops.launch import id_spec, spread

    settings = {"rounds": rounds, "dim": dim, "compress": "none", "sketch_dim": 0, "round_period": period, "min_wait": 2.0,
                "heartbeat": 1.0, "peer_timeout": 10.0, "checkpoint_every": 10, "seed": seed}
    blocks = spread(list(range(n)), processes)
    tmp = Path(tempfile.mkdtemp(prefix="membership-"))
    out: dict = {}
    for kind in ("open", "static"):
        run = tmp / kind
        run.mkdir()
        t0 = time.monotonic()
        if kind == "open":
            port = O.create(run, settings, "127.0.0.1", len(blocks[0]))
            procs = [O.start(run, b, O.certify(run, b, f"p{b[0]}"), "127.0.0.1", [], port if b[0] == 0 else None, False) for b in blocks]
        else:
            g = nx.random_regular_graph(ViewConfig().active, n, seed=seed)
            base = free_base_port(n)
            topo = T.Topology({p: T.PeerSpec(p, "127.0.0.1", base + p) for p in range(n)}, g, name="random-regular")
            dump_topology(topo, run / "topology.yaml")
            procs = [subprocess.Popen([sys.executable, "-m", "p2pfl", "--topology", str(run / "topology.yaml"), "--id", id_spec(b),
                                       "--run-dir", str(run), *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()], "--no-train"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for b in blocks]
        first = 10 * (rounds // 20) - 1  # the checkpoint of mid-run (--checkpoint-every 10), after the joins
        got: dict[int, np.ndarray] = {}  # each peer's checkpoint of round `first`, taken before it is replaced
        try:
            while len(got) < n and all(pr.poll() is None for pr in procs):
                for p in range(n):
                    if p not in got and (run / f"peer-{p}" / f"checkpoint-{first:08d}.sha256").exists():
                        got[p] = _models(run, [p], first)[0]
                time.sleep(0.2)
            codes = [pr.wait(timeout=1800) for pr in procs]
        finally:  # no peer outlives the bench
            for pr in procs:
                if pr.poll() is None:
                    pr.kill()
        recs = {p: read_jsonl(run / "metrics" / f"peer-{p}.jsonl") for p in range(n)}
        there = sorted(got)  # a peer that joined after round `first` has no checkpoint of it
        factor = (_spread(_models(run, there, None)) / _spread(np.stack([got[p] for p in there]))) ** (1 / (rounds - 1 - first))
        out[kind] = {"codes_ok": all(c == 0 for c in codes), "wall_s": round(time.monotonic() - t0, 1), "factor": factor,
                     "peers_measured": len(there), "last_first_round": max(rs[0]["round"] for rs in recs.values())}
        if kind == "open":
            mixing = None
            for rnd in range(rounds):
                at = {p: r for p, rs in recs.items() for r in rs if r["round"] == rnd}
                links = nx.Graph([(p, q) for p, r in at.items() for q in r["active"] if q in at and p in at[q]["active"]])
                links.add_nodes_from(at)
                if len(at) == n and all(r["mixed_with"] for r in at.values()) and nx.is_connected(links):
                    mixing = rnd
                    break
            half = [r for rs in recs.values() for r in rs if r["round"] >= rounds // 2]
            out[kind] |= {"rounds_to_all_mixing": mixing, "view_bytes": sum(r["view_bytes"] for r in half) / len(half),
                          "mean_degree": float(np.mean([r["degree"] for r in half]))}
    o = out["open"]
    return {"peers": n, "processes": processes, "rounds": rounds, "dim": dim, "round_period": period, "seed": seed,
            "runs_ok": o["codes_ok"] and out["static"]["codes_ok"], "wall_s_open": o["wall_s"], "wall_s_static": out["static"]["wall_s"],
            "rounds_to_all_mixing": o["rounds_to_all_mixing"], "last_join_round": o["last_first_round"],
            "peers_in_contraction": [o["peers_measured"], out["static"]["peers_measured"]], "membership_bytes_per_peer_round": round(o["view_bytes"], 1),
            "mean_degree": round(o["mean_degree"], 3), "factor_open": round(o["factor"], 4), "factor_static": round(out["static"]["factor"], 4),
            "contraction_vs_static": round(math.log(o["factor"]) / math.log(out["static"]["factor"]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=256)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--payload", type=int, default=160, help="bytes of a peer's contact payload")
    ap.add_argument("--no-delta", action="store_true", help="skip the default model's delta size")
    ap.add_argument("--rewires", type=int, default=ViewConfig().rewires, help="switches of a new peer")
    ap.add_argument("--processes", type=int, help="real peers in this many processes (setting daemon; see above)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--round-period", type=float, default=0.5)
    args = ap.parse_args()
    cfg = ViewConfig(rewires=args.rewires)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for s in seeds:
        hubs = run_attack(args.peers, s, cfg, args.payload, hub=4)
        runs.append(run_seed(args.peers, s, cfg, args.payload) | run_attack(args.peers, s, cfg, args.payload)
                    | {"attacker_view_share_hubs": hubs["attacker_view_share"], "honest_connected_hubs": hubs["honest_connected"]})
    keys = ("rounds_to_all_mixing", "rounds_to_full_views", "contraction_vs_static", "churn_contraction_vs_static",
            "attacker_view_share", "attacker_view_share_hubs", "membership_bytes_per_peer_round", "churn_mean_degree",
            "churn_rounds_connected", "churn_isolated_mean", "churn_rounds_to_first_link_max",
            "lambda_overlay", "lambda_static", "join_bytes_per_peer_round", "mean_degree")
    out: dict = {"setting": "sim", "peers": args.peers, "seeds": seeds, "payload_bytes": args.payload, "rewires": args.rewires,
                 "attacker_population_share": runs[0]["attacker_population_share"]}
    for k in keys:
        vals = [r[k] for r in runs]
        out[k] = max(vals) if (k.startswith("rounds") or k.endswith("_max")) and None not in vals else (
            None if None in vals else round(float(np.mean(vals)), 4))
    out["honest_connected"] = all(r["honest_connected"] for r in runs)
    out["honest_connected_hubs"] = all(r["honest_connected_hubs"] for r in runs)
    if args.processes:
        daemon = daemon_runs(args.peers, args.processes, args.rounds, args.dim, args.round_period, seeds[0])
        out["sim"] = {k: out.pop(k) for k in ("rounds_to_all_mixing", "membership_bytes_per_peer_round", "mean_degree", "contraction_vs_static")}
        out |= daemon | {"setting": "daemon (churn_* and attacker_* from the simulator)"}
    if not args.no_delta:
        d = delta_bytes()
        out["delta_bytes"] = d
        out["membership_bytes_share"] = round(out["membership_bytes_per_peer_round"] / (d * out["mean_degree"]), 4)
    out["per_seed"] = runs
    emit(out)


if __name__ == "__main__":
    main()
