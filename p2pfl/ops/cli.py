"""Command lines: p2pfl-peer, p2pfl-topology, p2pfl-report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2pfl.config import (
    SETTINGS_KEYS,
    ConfigError,
    PeerConfig,
    parse_ids,
    parse_pairs,
    peer_trainers,
    render,
    resolve,
)
from p2pfl.core import topology as topo_mod
from p2pfl.core.specs import check_open, check_peer
from p2pfl.errors import P2pflError
from p2pfl.host.files import dump_topology, load_topology
from p2pfl.learn.options import check_trainers
from p2pfl.ops import authority


def _peer_parser() -> argparse.ArgumentParser:
    d = PeerConfig  # the defaults shown are the dataclass's own, never restated
    p = argparse.ArgumentParser(prog="p2pfl-peer", description="Run p2pfl peers of a topology, or of an open network.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", type=Path, help="topology YAML (peers, edges, optional settings)")
    where.add_argument("--network", type=Path, help="an open network's file (name, authority, bootstrap peers, settings; "
                       "docs/membership.md): the peers join it with --cert and --listen")
    g = p.add_argument_group("open network (with --network)")
    g.add_argument("--cert", type=Path, help="admission certificates, one a line, one peer each (p2pfl-topology authority admit)")
    g.add_argument("--listen", help="HOST:PORT other peers dial; co-hosted peers take the next ports")
    g.add_argument("--revocations", type=Path, help="the authority's revocation file: read at start and whenever it changes, "
                   "and passed on to the network")
    p.add_argument("--id", help="the peers this process runs: an id, a range 0-63, a list 1,5,7-9, or local "
                   "(every peer of the file whose host is an address of this machine); required unless --print-config")
    p.add_argument("--print-config", action="store_true", help="print the effective settings (defaults < the topology's "
                   "settings < flags) as YAML, marking where each came from, and exit")
    p.add_argument("--rounds", type=int, help=f"gossip rounds (default {d.rounds})")
    p.add_argument("--run-dir", type=Path, help=f"where metrics, logs and adapters go (default {d.run_dir})")
    p.add_argument("--seed", type=int, help=f"run seed shared by all peers (default {d.seed})")
    p.add_argument("--no-train", action="store_true", default=None, help="gossip a random state of --dim floats, no model")
    p.add_argument("--dim", type=int, help=f"state size in --no-train mode, rounded up to a multiple of 128 (default {d.dim})")
    p.add_argument("--compress", help=f"codec spec, e.g. none, fp16, int8, sign, sign:2048, topk:0.05+int8 (default {d.compress})")
    p.add_argument("--gamma", type=float, help="CHOCO consensus step size (default: the codec's)")
    p.add_argument("--algorithm", choices=("dsgd", "gt"), help="dsgd: decentralized SGD; gt: gradient tracking with local "
                   f"steps (K-GT), its tracking variable in the same messages (default {d.algorithm})")
    p.add_argument("--sketch-dim", type=int, help=f"rows of the consensus sketch; 0 turns estimation off (default {d.sketch_dim})")
    p.add_argument("--estimator", choices=("auto", "flood", "gossip"), help="consensus estimate: flood every sketch (exact set, "
                   "O(n) per message), gossip-average them (O(1) per message, a lag), auto: flood up to 32 peers "
                   f"(default {d.estimator})")
    p.add_argument("--monitor-share", type=float, help="the consensus estimate's bytes per message at most this share of a delta's: "
                   f"sketches every few rounds, fewer gossip rows; 0: every round, whatever it costs (default {d.monitor_share:g})")
    p.add_argument("--heartbeat", type=float, help=f"seconds between heartbeats (default {d.heartbeat:g})")
    p.add_argument("--peer-timeout", type=float, help=f"mark a silent neighbour down after this many seconds (default {d.peer_timeout:g})")
    p.add_argument("--min-wait", type=float, help=f"floor of the adaptive round deadline in seconds (default {d.min_wait:g})")
    p.add_argument("--round-timeout", type=float, help=f"ceiling of the adaptive round deadline in seconds (default {d.round_timeout:g})")
    p.add_argument("--startup-timeout", type=float, help=f"how long to wait for neighbours at start (default {d.startup_timeout:g})")
    p.add_argument("--max-frame", type=int, help=f"largest accepted frame in bytes (default {d.max_frame >> 20} MiB)")
    p.add_argument("--default-malloc", dest="keep_memory", action="store_false", default=None, help="keep glibc's allocator thresholds (default: fixed ones, see p2pfl/net/alloc.py)")
    p.add_argument("--checkpoint-every", type=int, help=f"checkpoint every K rounds, and at exit; 0: at exit only (default {d.checkpoint_every})")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last good checkpoint in RUN_DIR/peer-<id>/")
    p.add_argument("--robust", help=f"robust mixing: off, clip[:TAU], trimmed:B, median (default {d.robust})")
    p.add_argument("--norm-factor", type=float, help=f"reject deltas over this many times the recent median norm; 0: off (default {d.norm_factor:g})")
    p.add_argument("--byzantine", help="fault injection for experiments: this peer misbehaves (scale:F, noise:S, labelflip, signflip[:F], "
                   "alie[:Z], ipm[:EPS], abuse[:RATE]; docs/attacks.md)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default off)")
    p.add_argument("--metrics-host", help=f"address for --metrics-port (default {d.metrics_host})")
    p.add_argument("--secret-key", type=Path, help="CurveZMQ secret key file (default <topology dir>/keys/peer-<id>.key_secret)")
    p.add_argument("--round-period", type=float, help=f"pace rounds: each lasts at least this many seconds (default {d.round_period:g})")
    p.add_argument("--threads", type=int, help="training worker threads, each with its own model copy (default 0: one per core, at most one per peer)")
    p.add_argument("--max-lag", type=int, help=f"neighbours this many rounds behind are not waited for (default {d.max_lag})")
    g = p.add_argument_group("hostile insiders (docs/security.md)")
    g.add_argument("--window", type=int, help=f"deltas buffered per neighbour, and rounds a delta may lead what was applied (default {d.window})")
    g.add_argument("--claim-ahead", type=int, help=f"rounds a neighbour's claim may lead this peer and its other neighbours (default {d.claim_ahead})")
    g.add_argument("--strikes", type=int, help=f"refusals (halved each round) that mark a neighbour misbehaving (default {d.strikes})")
    g.add_argument("--cooloff", type=float, help=f"seconds a misbehaving neighbour is ignored (default {d.cooloff:g})")
    g = p.add_argument_group("PPFM meta-levels (clusters of peers, cluster and global meta models)")
    g.add_argument("--clusters", help=f"off, auto (number chosen by silhouette) or a fixed number of clusters (default {d.clusters})")
    g.add_argument("--recluster-every", type=int, help=f"R: re-evaluate the clusters every R rounds, with hysteresis (default {d.recluster_every})")
    g.add_argument("--global-every", type=int, help=f"K: representatives gossip the global model every K rounds (default {d.global_every})")
    g.add_argument("--global-lambda", type=float, help=f"lambda: pull of each cluster model toward the global model (default {d.global_lambda:g})")
    g.add_argument("--cluster-beta", type=float, help=f"beta: Reptile step of the cluster model toward the task models (default {d.cluster_beta:g})")
    g.add_argument("--cluster-margin", type=float, help=f"silhouette gain a new clustering needs to replace the current one (default {d.cluster_margin:g})")
    g.add_argument("--fingerprint-dim", type=int, help=f"rows of the update fingerprint sketch (default {d.fingerprint_dim})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option (repeatable), e.g. --set local_steps=5; "
                   "values are typed by p2pfl.config.TrainerConfig")
    p.add_argument("--log-level", default="INFO")
    return p


def build_peer_config(argv: list[str] | None = None) -> tuple[PeerConfig, argparse.Namespace, list[int], dict[str, str]]:
    """Defaults < topology `settings:` < command line, all checked (keys, types and every value
    that needs no model, trainer options included) before anything heavy is imported; the ids this
    process hosts; where each value came from."""
    args = _peer_parser().parse_args(argv)
    if args.network is not None:
        return _open_config(args)
    for flag in ("cert", "listen", "revocations"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag}: only with --network (an open network); a topology lists its peers' addresses and keys")
    if args.id is None and not args.print_config:
        raise ConfigError("--id: required (an id, a range 0-63, a list 1,5,7-9, or local)")
    topo = load_topology(args.topology)
    flags = {k: v for k in SETTINGS_KEYS if (v := getattr(args, k, None)) is not None}
    source = str(args.topology)
    cfg, origin = resolve(args.topology, topo.ids[0], topo.settings, flags, args.set, source)
    entries = _entries(topo)
    check_peer(cfg, topo)
    check_trainers(peer_trainers(cfg, entries, source), cfg.seed, entries, source)  # every peer's, its trainer: entry applied
    if args.id is None:
        return cfg, args, topo.ids, origin
    local = None
    if args.id.strip() == "local":
        from p2pfl.host.daemon import local_ids

        local = local_ids(topo)
    ids = parse_ids(args.id, topo.ids, local)
    return replace(cfg, id=ids[0]), args, ids, origin


def _open_config(args: argparse.Namespace) -> tuple[PeerConfig, argparse.Namespace, list[int], dict[str, str]]:
    """An open network's peers: settings from its file and the flags; ids from the certificates."""
    from p2pfl.host.files import load_network

    net = load_network(args.network)
    flags = {k: v for k in SETTINGS_KEYS if (v := getattr(args, k, None)) is not None}
    cfg, origin = resolve(args.network, net.bootstrap[0].id, net.settings, flags, args.set, str(args.network))
    check_open(cfg)
    if not cfg.no_train:
        raise ConfigError(f"{args.network}: an open network's peers run --no-train for now (a peer's data share needs n, "
                          "which no peer knows); set no_train: true in its settings or pass --no-train")
    if args.print_config:
        return cfg, args, [], origin
    if args.id is not None:
        raise ConfigError("--id: an open network's peer ids come from their certificates (--cert)")
    for flag in ("cert", "listen"):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag}: required with --network")
    from p2pfl.host.site import OpenSite

    args.site = OpenSite(args.network, args.cert, args.listen, args.secret_key, args.revocations)
    return replace(cfg, id=args.site.ids[0]), args, args.site.ids, origin


def _entries(topo: topo_mod.Topology) -> dict[int, dict[str, Any]]:
    """Each peer entry's keys besides id, host and port (its own ``trainer:``, public key)."""
    return {p: s.extra for p, s in topo.peers.items()}


def peer_main(argv: list[str] | None = None) -> int:
    try:
        cfg, args, ids, origin = build_peer_config(argv)
    except P2pflError as e:
        print(f"p2pfl-peer: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(render(cfg, origin, ids, _entries(load_topology(cfg.topology)) if args.network is None else None), end="")
        return 0
    from p2pfl.host.daemon import run_peers
    from p2pfl.host.logs import setup_logging

    setup_logging(cfg.run_dir, ids, args.log_level)
    exporter = None
    if cfg.metrics_port:
        from p2pfl.ops.prometheus import PromExporter

        exporter = PromExporter(cfg.metrics_port, ids[0], cfg.metrics_host)
    return run_peers(cfg, ids, exporter, site=getattr(args, "site", None))


def topology_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="p2pfl-topology", description="Generate and inspect topology files; run an open "
                                "network's admission authority.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a topology file with explicit edges")
    g.add_argument("kind", choices=topo_mod.GENERATORS)
    g.add_argument("-n", type=int, required=True)
    g.add_argument("--base-port", type=int, default=29500)
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--seed", type=int, default=0, help="for erdos_renyi and small_world")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="generator parameter, e.g. p=0.3")
    g.add_argument("-o", "--output", type=Path)
    i = sub.add_parser("inspect", help="peers, degrees, diameter, spectral gap, predicted rounds")
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true")
    k = sub.add_parser("keygen", help="CurveZMQ key pairs: one (--name) or every peer's, listed in the topology")
    k.add_argument("--topology", type=Path, help="give every peer of this file a key pair and write the public keys into it")
    k.add_argument("--keys-dir", type=Path, help="where secret keys go (default <topology dir>/keys, or ./keys)")
    k.add_argument("--name", help="write only this key pair (e.g. peer-3) and print its public key")
    authority.add_parser(sub)
    args = p.parse_args(argv)
    try:
        if args.cmd == "authority":
            return authority.main(args)
        if args.cmd == "keygen":
            return _keygen(args)
        if args.cmd == "generate":
            params = {"seed": args.seed, **parse_pairs(args.param, "--param")}
            t = topo_mod.generate(args.kind, args.n, base_port=args.base_port, host=args.host, **params)
            if args.output:
                dump_topology(t, args.output)
                print(f"wrote {args.output}: {t.n} peers, {t.graph.number_of_edges()} edges, spectral gap {t.spectral_gap():.4g}")
            else:
                import yaml

                print(yaml.safe_dump(t.to_dict(), sort_keys=False, default_flow_style=None), end="")
            return 0
        t = load_topology(args.file)
    except P2pflError as e:
        print(f"p2pfl-topology: {e}", file=sys.stderr)
        return 2
    info = {
        "name": t.name,
        "peers": t.n,
        "edges": t.graph.number_of_edges(),
        "degrees": {p: t.degree(p) for p in t.ids},
        "diameter": t.diameter(),
        "lambda": t.mixing_lambda(),
        "spectral_gap": t.spectral_gap(),
        "rounds_to_1e-3": t.rounds_to(1e-3),
    }
    if t.schedule is not None:
        sched = t.schedule_for(0)
        info.update(schedule=str(t.schedule), degrees=dict.fromkeys(t.ids, sched.out_degree()), period=sched.period)
    if args.json:
        print(json.dumps(info))
        return 0
    if t.schedule is not None:
        return _print_schedule(info)
    print(f"topology {info['name']}: {info['peers']} peers, {info['edges']} edges, diameter {info['diameter']}")
    for p in t.ids:
        s = t.peers[p]
        print(f"  peer {p:>3} {s.host}:{s.port}  degree {t.degree(p)}  neighbours {t.neighbors(p)}")
    print(f"lambda = ||W - 11'/n||_2 = {info['lambda']:.6f}  (Metropolis-Hastings weights)")
    print(f"spectral gap 1 - lambda = {info['spectral_gap']:.6f}")
    print(f"rounds of exact gossip to reduce consensus distance 1e-3x: {info['rounds_to_1e-3']}")
    return 0


def _print_schedule(info: dict[str, Any]) -> int:
    """`inspect` of a file with a `schedule:`: what a round costs and how fast exact gossip mixes."""
    sends = next(iter(info["degrees"].values()))
    how = (f"CHOCO with a public copy per edge (edges recur every {info['period']} rounds)" if info["period"]
           else "whole models (edges are fresh each round): codecs none, fp16, bf16")
    print(f"topology {info['name']}: {info['peers']} peers on schedule {info['schedule']} "
          "(every peer draws round t's graph from the run seed and t; figures for seed 0)")
    print(f"each peer sends {sends} message{'s' if sends > 1 else ''} a round; compression: {how}")
    print(f"expected contraction per round ||M_T||^(1/T) = {info['lambda']:.6f}  (M_T: T rounds of the schedule's mixing matrices)")
    print(f"rounds of exact gossip to reduce consensus distance 1e-3x: {info['rounds_to_1e-3']}")
    print(f"rounds for a flooded message to reach every peer: {info['diameter']}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    import yaml
    import zmq.auth

    keys_dir = args.keys_dir or (args.topology.parent / "keys" if args.topology else Path("keys"))
    keys_dir.mkdir(parents=True, exist_ok=True)
    if args.name:
        pub_file, secret_file = zmq.auth.create_certificates(str(keys_dir), args.name)
        os.chmod(secret_file, 0o600)
        public, _ = zmq.auth.load_certificate(pub_file)
        print(public.decode())
        return 0
    if not args.topology:
        raise topo_mod.TopologyError("keygen: give --topology FILE (all peers) or --name NAME (one key pair)")
    topo = load_topology(args.topology)
    doc = yaml.safe_load(args.topology.read_text())
    for entry in doc["peers"]:
        pub_file, secret_file = zmq.auth.create_certificates(str(keys_dir), f"peer-{entry['id']}")
        os.chmod(secret_file, 0o600)
        entry["public_key"] = zmq.auth.load_certificate(pub_file)[0].decode()
    args.topology.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    print(f"wrote {topo.n} key pairs to {keys_dir} and their public keys to {args.topology}; keep *.key_secret private")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    from p2pfl.ops.pages import main

    return main(argv)
