"""Topologies: YAML <-> networkx, generators, Metropolis-Hastings mixing weights, spectral gap.

Every peer loads the same file and so knows the whole graph: degrees (for the mixing weights),
the diameter (for how long sketches need to flood) and the spectral gap (for the theory we
check against) are computed locally with no exchange. A file with a `schedule:` instead of edges
has a graph per round (`p2pfl.core.schedule`); its figures are the schedule's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import yaml

from p2pfl.config import unknown_key
from p2pfl.core.schedule import Schedule, ScheduleError, ScheduleSpec, check_spec, parse_schedule
from p2pfl.errors import P2pflError


class TopologyError(P2pflError, ValueError):
    """A topology file or generator request that cannot be used; the message names the field."""


@dataclass(frozen=True)
class PeerSpec:
    id: int
    host: str
    port: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass
class Topology:
    peers: dict[int, PeerSpec]
    graph: nx.Graph
    name: str = "custom"
    settings: dict[str, Any] = field(default_factory=dict)
    schedule: ScheduleSpec | None = None  # a graph per round instead of `graph`'s edges (which are then none)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # whole-graph figures, computed once

    @property
    def ids(self) -> list[int]:
        return sorted(self.peers)

    @property
    def n(self) -> int:
        return len(self.peers)

    def neighbors(self, peer: int) -> list[int]:
        return sorted(self.graph.neighbors(peer))

    def degree(self, peer: int) -> int:
        return int(self.graph.degree[peer])

    def mh_weights(self, peer: int) -> dict[int, float]:
        """Metropolis-Hastings weights of `peer`'s row: neighbours and itself."""
        d_i = self.degree(peer)
        row = {j: 1.0 / (1.0 + max(d_i, self.degree(j))) for j in self.neighbors(peer)}
        row[peer] = 1.0 - math.fsum(row.values())
        return row

    def mixing_matrix(self) -> np.ndarray:
        """Dense W in the order of `ids`; symmetric and doubly stochastic to rounding."""
        index = {p: k for k, p in enumerate(self.ids)}
        w = np.zeros((self.n, self.n))
        for i in self.ids:
            for j, v in self.mh_weights(i).items():
                w[index[i], index[j]] = v
        return w

    def schedule_for(self, seed: int) -> Schedule:
        """The schedule of a run with this seed; one object per seed, shared by co-hosted peers
        (its graphs are cached)."""
        if self.schedule is None:
            raise TopologyError(f"{self.name}: has edges, not a schedule")
        key = f"schedule/{seed}"
        if key not in self._memo:
            self._memo[key] = Schedule(self.schedule, tuple(self.ids), seed)
        return self._memo[key]

    def mixing_lambda(self) -> float:
        """lambda = ||W - 11^T/n||_2, the per-round contraction factor of exact gossip (for a
        schedule, its expected per-round contraction with seed 0). Memoised: co-hosted peers share
        one Topology, and this is O(n^3)."""
        if "lambda" not in self._memo:
            s = self.schedule
            self._memo["lambda"] = self.schedule_for(0).contraction() if s else second_eigenvalue(self.mixing_matrix())
        return self._memo["lambda"]

    def spectral_gap(self) -> float:
        return 1.0 - self.mixing_lambda()

    def diameter(self) -> int:
        """Hops between the farthest peers; for a schedule, rounds until a flooded message has
        reached every peer (seed 0)."""
        if "diameter" not in self._memo:  # all-pairs BFS: memoised like mixing_lambda
            if self.schedule is not None:
                self._memo["diameter"] = self.schedule_for(0).flood_rounds()
            else:
                self._memo["diameter"] = int(nx.diameter(self.graph)) if self.n > 1 else 0
        return self._memo["diameter"]

    def rounds_to(self, reduction: float) -> int:
        """Rounds T with lambda^T <= reduction: the theory's bound on exact gossip (for a schedule,
        the first T whose product of mixing matrices cuts every disagreement that much)."""
        if self.schedule is not None:
            return self.schedule_for(0).rounds_to(reduction)
        lam = self.mixing_lambda()
        if lam <= 0.0:
            return 1
        return max(1, math.ceil(math.log(reduction) / math.log(lam)))

    def to_dict(self) -> dict[str, Any]:
        peers = []
        for p in self.ids:
            spec = self.peers[p]
            peers.append({"id": spec.id, "host": spec.host, "port": spec.port, **spec.extra})
        out: dict[str, Any] = {"name": self.name, "peers": peers}
        if self.schedule is not None:
            out["schedule"] = str(self.schedule)
        else:
            out["edges"] = sorted([min(a, b), max(a, b)] for a, b in self.graph.edges)
        if self.settings:
            out["settings"] = self.settings
        return out

    def network_id(self) -> int:
        """A 63-bit digest of the peers' addresses and the graph (or schedule), as `to_dict` writes
        them: every message carries it, so one from another network on a reused port, or from a
        peer started with a different file, is refused instead of mixed. Settings, the name and
        peers' extra keys are left out: they may change between restarts of one network."""
        d = self.to_dict()
        core = {"peers": [[q["id"], q["host"], q["port"]] for q in d["peers"]], **{k: d[k] for k in ("schedule", "edges") if k in d}}
        digest = hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1  # 63 bits: a non-negative msgpack int


def second_eigenvalue(w: np.ndarray) -> float:
    n = w.shape[0]
    return float(np.linalg.norm(w - np.full((n, n), 1.0 / n), 2))


# ---------------------------------------------------------------- generators

def _torus_dims(n: int) -> tuple[int, int]:
    r = math.isqrt(n)
    while n % r:
        r -= 1
    return r, n // r


def generate_graph(kind: str, n: int, **params: Any) -> nx.Graph:
    """Graph on nodes 0..n-1. Randomised kinds take `seed` and are retried until connected."""
    if n < 1:
        raise TopologyError(f"n: need at least 1 peer, got {n}")
    seed = int(params.get("seed", 0))
    if kind == "ring":
        g = nx.cycle_graph(n) if n > 2 else nx.path_graph(n)
    elif kind == "complete":
        g = nx.complete_graph(n)
    elif kind == "star":
        g = nx.star_graph(n - 1)
    elif kind == "path":
        g = nx.path_graph(n)
    elif kind == "torus":
        rows, cols = params.get("rows"), params.get("cols")
        if rows is None or cols is None:
            rows, cols = _torus_dims(n)
        if int(rows) * int(cols) != n:
            raise TopologyError(f"torus: rows*cols must equal n={n}, got {rows}x{cols}")
        grid = nx.grid_2d_graph(int(rows), int(cols), periodic=True)
        g = nx.convert_node_labels_to_integers(grid, ordering="sorted")
    elif kind == "exponential":
        # Each i links to i +- 2^k (Ying et al. 2021's static exponential graph, undirected).
        g = nx.Graph()
        g.add_nodes_from(range(n))
        k = 1
        while k < n:
            for i in range(n):
                g.add_edge(i, (i + k) % n)
            k *= 2
        g.remove_edges_from(nx.selfloop_edges(g))
    elif kind in ("erdos_renyi", "small_world"):
        for attempt in range(100):
            if kind == "erdos_renyi":
                p = float(params.get("p", min(1.0, 2.0 * math.log(max(n, 2)) / max(n, 2))))
                g = nx.erdos_renyi_graph(n, p, seed=seed + attempt)
            else:
                k_nb = int(params.get("k", 4))
                p = float(params.get("p", 0.2))
                g = nx.watts_strogatz_graph(n, min(k_nb, n - 1), p, seed=seed + attempt)
            if nx.is_connected(g):
                break
        else:
            raise TopologyError(f"{kind}: no connected graph in 100 draws for n={n}, params={params}")
    else:
        raise TopologyError(f"kind: unknown topology kind {kind!r}; choose one of {sorted(GENERATORS)}")
    return g


GENERATORS = ("ring", "torus", "exponential", "complete", "star", "path", "erdos_renyi", "small_world")


def generate(kind: str, n: int, base_port: int = 29500, host: str = "127.0.0.1", **params: Any) -> Topology:
    g = generate_graph(kind, n, **params)
    peers = {i: PeerSpec(i, host, base_port + i) for i in range(n)}
    topo = Topology(peers=peers, graph=g, name=f"{kind}-{n}")
    validate(topo)
    return topo


def scheduled(spec: str, n: int, base_port: int = 29500, host: str = "127.0.0.1") -> Topology:
    """n peers on a time-varying schedule (`p2pfl.core.schedule`), no edges."""
    try:
        sched = parse_schedule(spec)
        check_spec(sched, n)
    except ScheduleError as e:
        raise TopologyError(f"schedule: {e}") from None
    g = nx.Graph()
    g.add_nodes_from(range(n))
    return Topology(peers={i: PeerSpec(i, host, base_port + i) for i in range(n)}, graph=g, name=f"{sched.kind}-{n}", schedule=sched)


# ---------------------------------------------------------------- loading

def _need(mapping: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in mapping:
        raise TopologyError(f"{where}: missing field {key!r}")
    value = mapping[key]
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise TopologyError(f"{where}.{key}: expected {typ.__name__}, got {value!r}")
    return value


TOP_LEVEL_KEYS = ("name", "peers", "edges", "generator", "schedule", "settings")


def from_dict(doc: Any, source: str = "<topology>") -> Topology:
    if not isinstance(doc, dict):
        raise TopologyError(f"{source}: top level must be a mapping with 'peers', got {type(doc).__name__}")
    for key in doc:  # a misspelt 'edge:' or 'setings:' would otherwise be dropped without a word
        if key not in TOP_LEVEL_KEYS:
            raise TopologyError(str(unknown_key(key, TOP_LEVEL_KEYS, "top-level key", source)))
    raw_peers = doc.get("peers")
    if not isinstance(raw_peers, list) or not raw_peers:
        raise TopologyError(f"{source}: 'peers' must be a non-empty list of mappings")
    peers: dict[int, PeerSpec] = {}
    for k, entry in enumerate(raw_peers):
        where = f"{source}: peers[{k}]"
        if not isinstance(entry, dict):
            raise TopologyError(f"{where}: expected a mapping with id/host/port, got {entry!r}")
        pid = _need(entry, "id", int, where)
        host = _need(entry, "host", str, where)
        port = _need(entry, "port", int, where)
        if pid in peers:
            raise TopologyError(f"{where}.id: duplicate peer id {pid}")
        if not 0 < port < 65536:
            raise TopologyError(f"{where}.port: {port} is not a TCP port")
        extra = {key: v for key, v in entry.items() if key not in ("id", "host", "port")}
        peers[pid] = PeerSpec(pid, host, port, extra)
    g = nx.Graph()
    g.add_nodes_from(peers)
    schedule = _schedule_of(doc, len(peers), source)
    if "edges" in doc and "generator" in doc:
        raise TopologyError(f"{source}: give either 'edges' or 'generator', not both")
    if "edges" in doc:
        edges = doc["edges"]
        if not isinstance(edges, list):
            raise TopologyError(f"{source}: 'edges' must be a list of [a, b] pairs")
        for k, e in enumerate(edges):
            where = f"{source}: edges[{k}]"
            if not (isinstance(e, list | tuple) and len(e) == 2 and all(isinstance(v, int) for v in e)):
                raise TopologyError(f"{where}: expected a pair of peer ids, got {e!r}")
            a, b = e
            for v in (a, b):
                if v not in peers:
                    raise TopologyError(f"{where}: unknown peer id {v}")
            if a == b:
                raise TopologyError(f"{where}: self-loop on peer {a}")
            g.add_edge(a, b)
    elif "generator" in doc:
        gen = doc["generator"]
        if not isinstance(gen, dict) or "kind" not in gen:
            raise TopologyError(f"{source}: 'generator' must be a mapping with 'kind' and parameters")
        params = {k: v for k, v in gen.items() if k != "kind"}
        order = sorted(peers)
        base = generate_graph(str(gen["kind"]), len(order), **params)
        g.add_edges_from((order[a], order[b]) for a, b in base.edges)
    elif schedule is None:  # a schedule draws every round's edges itself
        raise TopologyError(f"{source}: needs an 'edges' list, a 'generator' mapping or a 'schedule'")
    settings = doc.get("settings", {}) or {}
    if not isinstance(settings, dict):
        raise TopologyError(f"{source}: 'settings' must be a mapping")
    topo = Topology(peers=peers, graph=g, name=str(doc.get("name", Path(source).stem)), settings=settings, schedule=schedule)
    validate(topo, source)
    return topo


def _schedule_of(doc: dict[str, Any], n: int, source: str) -> ScheduleSpec | None:
    """A file's `schedule:`; refused beside `edges:` or `generator:`, whose graph it would replace."""
    if "schedule" not in doc:
        return None
    fixed = [k for k in ("edges", "generator") if k in doc]
    if fixed:
        raise TopologyError(f"{source}: 'schedule' draws every round's edges itself; remove '{fixed[0]}' "
                            "(a scheduled file lists only peers)")
    try:
        spec = parse_schedule(doc["schedule"])
        check_spec(spec, n)
    except ScheduleError as e:
        raise TopologyError(f"{source}: schedule: {e}") from None
    return spec


def validate(topo: Topology, source: str = "<topology>") -> None:
    if topo.schedule is None and topo.n > 1 and not nx.is_connected(topo.graph):
        parts = [sorted(c) for c in nx.connected_components(topo.graph)]
        raise TopologyError(f"{source}: graph is not connected; components {parts}")
    seen: dict[tuple[str, int], int] = {}
    for spec in topo.peers.values():
        key = (spec.host, spec.port)
        if key in seen:
            raise TopologyError(f"{source}: peers {seen[key]} and {spec.id} both use {spec.host}:{spec.port}")
        seen[key] = spec.id


def load_yaml(text: str, source: str) -> Any:
    """The document of a YAML text; an error names its line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TopologyError(f"{source}: invalid YAML{where}: {getattr(e, 'problem', e)}") from e


def parse(text: str, source: str = "<topology>") -> Topology:
    """A topology from the text of a YAML file (read by `p2pfl.host.files.load_topology`)."""
    return from_dict(load_yaml(text, source), source)


def closed_form_gap(kind: str, n: int) -> float:
    """Asymptotic spectral gaps quoted in DESIGN.md, for sanity checks and reports."""
    if kind == "ring":
        return 4 * math.pi**2 / (3 * n**2)
    if kind == "torus":
        return 4 * math.pi**2 / (5 * n)
    if kind == "complete":
        return 1.0
    if kind == "exponential":
        return 2.0 / math.log2(n)
    raise TopologyError(f"kind: no closed form for {kind!r}")
