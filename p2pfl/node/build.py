"""A node from its settings: the one place that picks its parts (a neighbourhood and a mixer, and
the consensus monitor, the algorithm and any injected faults). Settings that have no meaning are
refused by `core.specs`, which the command line also runs before it loads a model."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import networkx as nx
import torch

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.core.abuse import Abuser, abuse_rate
from p2pfl.core.admission import Revocations
from p2pfl.core.codec import CodecError
from p2pfl.core.compress import CompressionPlan
from p2pfl.core.conduct import Limits
from p2pfl.core.consensus import flatten, shared_sketcher
from p2pfl.core.estimate import (
    MIN_ROWS,
    ROW_KEY_BYTES,
    EstimatorConfig,
    GossipEstimator,
    flood_plan,
    gossip_within,
)
from p2pfl.core.gossip import FLAT, ChocoEngine
from p2pfl.core.membership.messages import ViewConfig
from p2pfl.core.membership.size import SizeEstimator
from p2pfl.core.membership.views import Views
from p2pfl.core.robust import parse_byzantine
from p2pfl.core.scheduled import scheduled_gossip
from p2pfl.core.specs import (
    check_algorithm,
    check_clusters,
    check_estimator,
    check_monitor_share,
    check_open,
)
from p2pfl.core.topology import Topology, TopologyError
from p2pfl.core.wire import Kind, Message, TensorPayload, encode, frames_nbytes
from p2pfl.node.faults import Faults
from p2pfl.node.intake import Intake
from p2pfl.node.membership import Open, OpenMixer
from p2pfl.node.mixer import ChocoMixer, Mixer, ScheduledMixer
from p2pfl.node.neighbourhood import Neighbourhood, Scheduled, StaticGraph
from p2pfl.node.node import Node, NodeSpec, Parts
from p2pfl.node.piggyback import SKETCH_TENSOR
from p2pfl.node.ppfm import LevelsMixer, Overlay
from p2pfl.node.records import Monitor
from p2pfl.node.tracking import Dsgd, GradientTracking
from p2pfl.ppfm.levels import Levels, PpfmConfig

FLOOD_UP_TO = 32  # --estimator auto floods sketches up to this many peers, and gossip-averages beyond


INC_PROBE = (1 << 64) - 1  # the largest incarnation: a probe's header is never smaller than a real one's
HEARTBEATS_A_ROUND = 3  # heartbeats a neighbour gets between two deltas, in the monitoring budget: rounds of up to 4 --heartbeat periods


@dataclass(frozen=True)
class WireCosts:
    """What one base-channel message of this peer costs on the wire, in bytes (from encoding
    probes: no codec's size depends on the values)."""

    payload: int  # a delta's tensor payload
    header: int  # the rest of a delta message: header frame and descriptors
    control: int  # a heartbeat, hello, goodbye or empty (drain-round) delta
    block: int  # a flooded block's descriptor and framing, beside its rows


def wire_costs(engine: ChocoEngine, net: int, rounds: int, sender: int) -> WireCosts:
    """The same for every peer of a run (their budgets, hence their sketch rows, must agree): the
    probes carry the run's largest peer id `sender` and the largest incarnation, not this peer's."""
    g = torch.Generator().manual_seed(0)
    named = [(FLAT, engine.plan.default, (engine.numel,))] if engine.flat else [
        (n, engine.plan.codec_for(n), tuple(engine.x[n].shape)) for n in engine.order]
    tensors = {}
    for name, codec, shape in named:
        enc = codec.encode(torch.randn(math.prod(shape), generator=g).reshape(shape), seed=0)
        tensors[name] = TensorPayload(codec=codec.spec, shape=shape, parts=dict(enc.parts), meta=dict(enc.meta))
    delta = Message(Kind.DELTA, sender, round=rounds, seq=rounds, inc=INC_PROBE, tensors=tensors, net=net)
    size = frames_nbytes(encode(delta))
    payload = sum(tp.nbytes() for tp in tensors.values())
    row = torch.zeros((1, 1), dtype=torch.float64)
    blocked = replace(delta, tensors={**tensors, SKETCH_TENSOR: TensorPayload(codec="none", shape=(1, 1), parts={"data": row})},
                      info={"sketches": [[sender, rounds]]})
    control = frames_nbytes(encode(replace(delta, kind=Kind.HEARTBEAT, tensors={})))
    return WireCosts(payload, size - payload, control, frames_nbytes(encode(blocked)) - size - 8 - ROW_KEY_BYTES)


def monitor_budget(share: float, costs: WireCosts, drain: int, rounds: int, blocks: int = 0) -> float:
    """Bytes a message may spend on the consensus estimate's rows: `share` of a delta's payload,
    less what is not delta anyway (the delta's header, HEARTBEATS_A_ROUND heartbeats, the `drain`
    rounds' empty deltas spread over the run, and `blocks` block descriptors). 0 (no cap) when
    `share` is 0; a tiny positive budget when the overhead alone is over it (the estimate then
    comes as rarely as a run allows)."""
    if share <= 0:
        return 0.0
    overhead = costs.header + (HEARTBEATS_A_ROUND + drain / max(1, rounds)) * costs.control + blocks * costs.block
    return max(1.0, share * costs.payload - overhead)


@functools.lru_cache(maxsize=4)
def flood_deliveries(edges: frozenset[tuple[int, int]]) -> int:
    """Row deliveries of one flooded sketch round, all origins together: a row crosses every edge
    once, and both ways where its two ends are as far from the origin (each forwards it to the
    other in the same round). Between n |E| and 2 n |E|: flooding costs O(n) rows a message."""
    g = nx.Graph(edges)
    return sum(2 if dist[u] == dist[v] else 1 for _, dist in nx.all_pairs_shortest_path_length(g) for u, v in edges)


def estimator_config(kind: str, topo: Topology, k: int, rounds: int,
                     budget: Callable[[int], float] = lambda drain: 0.0) -> EstimatorConfig | None:
    """None for flooding (`consensus.SketchBook`), else the gossip estimator's settings, within
    `budget(drain)` bytes a message of the run (`gossip_within`), its payload riding on the lag + 1
    drain rounds' messages too. Its period is a divisor of `rounds` when one is at least half the
    default (with fewer rows for the more instances in flight), so the last round gets an estimate."""
    check_estimator(kind)
    if k <= 0 or kind == "flood" or (kind == "auto" and topo.n <= FLOOD_UP_TO):
        return None
    default = EstimatorConfig.for_topology(k, topo.mixing_lambda())
    drain = default.lag + 1  # rounds after the last that carry its instance, beside the run's own
    per_message = budget(drain) * rounds / (rounds + drain) if rounds > 0 else budget(drain)
    base = gossip_within(default, per_message)
    k = base.k
    every = max(d for d in range(1, base.every + 1) if rounds % d == 0) if rounds > 0 else base.every
    if 0 < rounds <= base.every:  # a run shorter than the period: its last round still starts an instance
        every = rounds
    elif 2 * every < base.every:
        every = base.every
    elif every < base.every and per_message > 0:  # more instances in flight: fewer rows, the same bytes
        k = max(MIN_ROWS, min(k, int(per_message // (8 * math.ceil(base.lag / every))) - 1))
    return EstimatorConfig(k=k, lag=base.lag, every=every)


def make_node(cfg: PeerConfig, topo: Topology, spec: NodeSpec, log: logging.Logger | None = None) -> Node:
    """Peer `cfg.id` of `topo`, built from the parts its settings ask for."""
    log = log or logging.getLogger(f"p2pfl.node.{cfg.id}")
    return Node(cfg, spec, make_parts(cfg, topo, spec, log), log)


def make_parts(cfg: PeerConfig, topo: Topology, spec: NodeSpec, log: logging.Logger) -> Parts:
    if cfg.id not in topo.peers:
        raise TopologyError(f"--id: peer {cfg.id} is not in {cfg.topology} (ids {topo.ids})")
    me = cfg.id
    schedule = topo.schedule_for(cfg.seed) if topo.schedule is not None else None
    algo = GradientTracking(spec.x0) if check_algorithm(cfg, schedule is not None) else Dsgd()
    plan = _plan(cfg)
    weights = topo.mh_weights(me)
    weights.pop(me)
    engine = ChocoEngine(me, weights, algo.extend(spec.x0), plan, cfg.gamma, seed=cfg.seed, inc=spec.inc,
                         robust=cfg.robust, norm_factor=cfg.norm_factor, window=cfg.window)
    exchange = None
    if schedule is not None:  # the engine only holds the model; the schedule's exchange moves it
        exchange = scheduled_gossip(me, schedule, engine.x, engine.plan, cfg.gamma, cfg.seed, spec.inc, cfg.norm_factor, cfg.window)
    attack, rate = parse_byzantine(cfg.byzantine), abuse_rate(cfg.byzantine)

    sketch_dim = cfg.sketch_dim
    if schedule is not None and cfg.estimator == "auto" and topo.n > FLOOD_UP_TO:
        sketch_dim = 0  # the gossip estimator averages with fixed weights; flooding is O(n) per message
    numel = flatten(spec.x0).numel()
    check_monitor_share(cfg.monitor_share)
    costs = wire_costs(engine, topo.network_id(), cfg.rounds, max(topo.ids))

    def budget(drain: int, blocks: int = 0) -> float:
        return monitor_budget(cfg.monitor_share, costs, drain, cfg.rounds, blocks)

    k = min(sketch_dim, 1 << max(0, (numel - 1).bit_length()))  # a sketch has at most the padded size's rows
    diameter = schedule.flood_rounds() if schedule is not None else topo.diameter()
    est_cfg = None if schedule is not None else estimator_config(cfg.estimator, topo, k, cfg.rounds,
                                                                 lambda drain: budget(drain, blocks=1))
    every = 1
    if est_cfg is not None:
        k = est_cfg.k
    elif schedule is None:
        edges = frozenset(tuple(e) for e in topo.graph.edges())
        k, every = flood_plan(flood_deliveries(edges), 2 * len(edges), diameter, k, budget(diameter), cfg.rounds, costs.block)
    sketcher = shared_sketcher(numel, k, cfg.seed) if k > 0 else None
    estimator = GossipEstimator(me, weights, est_cfg) if est_cfg is not None else None

    k = check_clusters(cfg, topo.n)
    levels = None
    if k is not None:
        pcfg = PpfmConfig(k=k, recluster_every=cfg.recluster_every, global_every=cfg.global_every, lam=cfg.global_lambda,
                          beta=cfg.cluster_beta, margin=cfg.cluster_margin, fingerprint_dim=cfg.fingerprint_dim, lag=diameter + 1)
        levels = Levels(me, topo, spec.x0, pcfg, plan, cfg.gamma, seed=cfg.seed, inc=spec.inc)
        for eng, stride in ((levels.cluster, 1), (levels.glob, cfg.global_every)):  # the global level sends every K rounds
            eng.window, eng.round_window = cfg.window, cfg.window * stride
    monitor = Monitor(me, topo.ids, sketcher, diameter, estimator, levels.sketcher.k if levels else None, log, every=every, last=cfg.rounds)

    nbh: Neighbourhood
    mixer: Mixer
    if schedule is not None and exchange is not None:
        nbh = Scheduled(me, topo, schedule, cfg, log)
        mixer = ScheduledMixer(engine, exchange)
    elif levels is not None:
        nbh = Overlay(me, topo, cfg, levels, log)
        mixer = LevelsMixer(engine, levels, monitor, spec.train, log)
    else:
        nbh = StaticGraph(me, topo, cfg, log)
        mixer = ChocoMixer(engine)

    abuser = None if rate is None else Abuser(me, engine.layout, rate, (SKETCH_TENSOR, sketcher.k if sketcher else 1), spec.inc)
    return Parts(nbh, mixer, monitor, algo, Faults(attack, abuser), _intake(cfg, topo.network_id(), spec, monitor.drain, log))


def _intake(cfg: PeerConfig, net: int, spec: NodeSpec, drain: int, log: logging.Logger) -> Intake:
    limits = Limits(claim_ahead=max(cfg.claim_ahead, 2 * cfg.max_lag), last_round=cfg.rounds + drain,
                    strikes=cfg.strikes, cooloff=cfg.cooloff)
    return Intake(cfg.id, net, spec.secure, cfg.max_frame, limits, log)


def _plan(cfg: PeerConfig) -> CompressionPlan:
    try:
        return CompressionPlan.parse(cfg.compress)
    except CodecError as e:
        raise ConfigError(f"--compress {cfg.compress!r}: {e}") from None


def make_open_node(cfg: PeerConfig, contact: int | None, spec: NodeSpec, net: int, views: ViewConfig | None = None,
                   payload: bytes = b"", size: tuple[int, int] = (64, 16), log: logging.Logger | None = None,
                   revocations: Revocations | None = None, wall: float = 0.0, shared: Revocations | None = None) -> Node:
    """Peer `cfg.id` of an open network (`net`: its id, `core.admission.network_id`), joining
    through `contact` (None: the first peer); `payload`: its contact for the views (address and
    certificate); `size`: the size estimator's K and epoch in rounds; `revocations`, `wall` and
    `shared`: `membership.Open`'s. D-SGD with CHOCO on the active view (`node.membership`); the consensus
    estimate is absent (`membership.NO_ESTIMATE`)."""
    log = log or logging.getLogger(f"p2pfl.node.{cfg.id}")
    check_open(cfg)
    me = cfg.id
    engine = ChocoEngine(me, {}, spec.x0, _plan(cfg), cfg.gamma, seed=cfg.seed, inc=spec.inc, robust=cfg.robust,
                         norm_factor=cfg.norm_factor, window=cfg.window)
    nbh = Open(me, Views(me, views, seed=cfg.seed, payload=payload), contact, spec.inc, cfg, log, revocations, wall, shared)
    mixer = OpenMixer(engine, SizeEstimator(me, size[0], size[1], cfg.seed))
    monitor = Monitor(me, [me], None, 1, None, None, log)
    return Node(cfg, spec, Parts(nbh, mixer, monitor, Dsgd(), Faults(None, None), _intake(cfg, net, spec, monitor.drain, log)), log)
