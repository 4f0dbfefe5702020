"""Command lines: p2pfl-peer, p2pfl-topology, p2pfl-report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from p2pfl import topology as topo_mod


def _peer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2pfl-peer", description="Run one p2pfl peer of a topology.")
    p.add_argument("--topology", required=True, type=Path, help="topology YAML (peers, edges, optional settings)")
    p.add_argument("--id", required=True, help="the peers this process runs: an id, a range 0-63, a list 1,5,7-9, or local "
                   "(every peer of the file whose host is an address of this machine)")
    p.add_argument("--rounds", type=int, help="gossip rounds (default 50)")
    p.add_argument("--run-dir", type=Path, help="where metrics, logs and adapters go (default runs/default)")
    p.add_argument("--seed", type=int, help="run seed shared by all peers (default 0)")
    p.add_argument("--no-train", action="store_true", default=None, help="gossip a random state of --dim floats, no model")
    p.add_argument("--dim", type=int, help="state size in --no-train mode (default 131072)")
    p.add_argument("--compress", help="codec spec, e.g. none, fp16, int8, sign, topk:0.05, topk:0.05+int8")
    p.add_argument("--gamma", type=float, help="CHOCO consensus step size (default: the codec's)")
    p.add_argument("--sketch-dim", type=int, help="rows of the consensus sketch; 0 turns estimation off (default 1024)")
    p.add_argument("--estimator", choices=("auto", "flood", "gossip"), help="consensus estimate: flood every sketch (exact set, "
                   "O(n) per message), gossip-average them (O(1) per message, a lag), auto: flood up to 32 peers (default)")
    p.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default 1)")
    p.add_argument("--peer-timeout", type=float, help="mark a silent neighbour down after this many seconds (default 10)")
    p.add_argument("--min-wait", type=float, help="floor of the adaptive round deadline in seconds (default 2)")
    p.add_argument("--round-timeout", type=float, help="ceiling of the adaptive round deadline in seconds (default 120)")
    p.add_argument("--startup-timeout", type=float, help="how long to wait for neighbours at start (default 60)")
    p.add_argument("--max-frame", type=int, help="largest accepted frame in bytes (default 256 MiB)")
    p.add_argument("--default-malloc", dest="keep_memory", action="store_false", default=None, help="keep glibc's allocator thresholds (default: fixed ones, see p2pfl/alloc.py)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every K rounds (default 0: at exit only)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last good checkpoint in RUN_DIR/peer-<id>/")
    p.add_argument("--robust", help="robust mixing: off (default), clip[:TAU], trimmed:B, median")
    p.add_argument("--norm-factor", type=float, help="reject deltas over this many times the recent median norm (default 0: off)")
    p.add_argument("--byzantine", help="fault injection for experiments: this peer gossips a corrupted model (scale:F, noise:S)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default off)")
    p.add_argument("--metrics-host", help="address for --metrics-port (default 127.0.0.1)")
    p.add_argument("--secret-key", type=Path, help="CurveZMQ secret key file (default <topology dir>/keys/peer-<id>.key_secret)")
    p.add_argument("--round-period", type=float, help="pace rounds: each lasts at least this many seconds (default 0)")
    p.add_argument("--threads", type=int, help="training worker threads, each with its own model copy (default 0: one per core, at most one per peer)")
    p.add_argument("--max-lag", type=int, help="neighbours this many rounds behind are not waited for (default 10)")
    g = p.add_argument_group("PPFM meta-levels (clusters of peers, cluster and global meta models)")
    g.add_argument("--clusters", help="off (default), auto (number chosen by silhouette) or a fixed number of clusters")
    g.add_argument("--recluster-every", type=int, help="R: re-evaluate the clusters every R rounds, with hysteresis (default 5)")
    g.add_argument("--global-every", type=int, help="K: representatives gossip the global model every K rounds (default 5)")
    g.add_argument("--global-lambda", type=float, help="lambda: pull of each cluster model toward the global model (default 0.05)")
    g.add_argument("--cluster-beta", type=float, help="beta: Reptile step of the cluster model toward the task models (default 1)")
    g.add_argument("--cluster-margin", type=float, help="silhouette gain a new clustering needs to replace the current one (default 0.1)")
    g.add_argument("--fingerprint-dim", type=int, help="rows of the update fingerprint sketch (default 256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option (repeatable), e.g. --set local_steps=5")
    p.add_argument("--log-level", default="INFO")
    return p


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_peer_config(argv: list[str] | None = None) -> tuple[Any, str, list[int]]:
    """Defaults < topology `settings:` < command line; and the ids this process hosts."""
    from p2pfl.config import PeerConfig, parse_ids

    args = _peer_parser().parse_args(argv)
    topo = topo_mod.load(args.topology)
    local = None
    if args.id.strip() == "local":
        from p2pfl.peer import local_ids

        local = local_ids(topo)
    ids = parse_ids(args.id, topo.ids, local)
    known = {f.name for f in fields(PeerConfig)}
    settings = dict(topo.settings)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise topo_mod.TopologyError(f"{args.topology}: unknown settings {unknown}; known: {sorted(known - {'topology', 'id'})}")
    trainer = dict(settings.pop("trainer", {}) or {})
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"p2pfl-peer: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        trainer[k.strip()] = _parse_value(v)
    values: dict[str, Any] = {**settings, "trainer": trainer}
    values["id"] = ids[0]
    for f in fields(PeerConfig):
        if f.name == "id":
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    if "run_dir" in values:
        values["run_dir"] = Path(values["run_dir"])
    return PeerConfig(**values), args.log_level, ids


def peer_main(argv: list[str] | None = None) -> int:
    from p2pfl.config import ConfigError

    try:
        cfg, level, ids = build_peer_config(argv)
    except (topo_mod.TopologyError, ConfigError, TypeError) as e:
        print(f"p2pfl-peer: {e}", file=sys.stderr)
        return 2
    from p2pfl.logs import setup_logging
    from p2pfl.peer import run_peers

    setup_logging(cfg.run_dir, ids, level)
    return run_peers(cfg, ids)


def topology_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="p2pfl-topology", description="Generate and inspect topology files.")
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
    args = p.parse_args(argv)
    try:
        if args.cmd == "keygen":
            return _keygen(args)
        if args.cmd == "generate":
            params = {"seed": args.seed}
            for item in args.param:
                k, _, v = item.partition("=")
                params[k] = _parse_value(v)
            t = topo_mod.generate(args.kind, args.n, base_port=args.base_port, host=args.host, **params)
            if args.output:
                t.dump(args.output)
                print(f"wrote {args.output}: {t.n} peers, {t.graph.number_of_edges()} edges, spectral gap {t.spectral_gap():.4g}")
            else:
                import yaml

                print(yaml.safe_dump(t.to_dict(), sort_keys=False, default_flow_style=None), end="")
            return 0
        t = topo_mod.load(args.file)
    except topo_mod.TopologyError as e:
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
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"topology {info['name']}: {info['peers']} peers, {info['edges']} edges, diameter {info['diameter']}")
    for p in t.ids:
        s = t.peers[p]
        print(f"  peer {p:>3} {s.host}:{s.port}  degree {t.degree(p)}  neighbours {t.neighbors(p)}")
    print(f"lambda = ||W - 11'/n||_2 = {info['lambda']:.6f}  (Metropolis-Hastings weights)")
    print(f"spectral gap 1 - lambda = {info['spectral_gap']:.6f}")
    print(f"rounds of exact gossip to reduce consensus distance 1e-3x: {info['rounds_to_1e-3']}")
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
    topo = topo_mod.load(args.topology)
    doc = yaml.safe_load(args.topology.read_text())
    for entry in doc["peers"]:
        pub_file, secret_file = zmq.auth.create_certificates(str(keys_dir), f"peer-{entry['id']}")
        os.chmod(secret_file, 0o600)
        entry["public_key"] = zmq.auth.load_certificate(pub_file)[0].decode()
    args.topology.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    print(f"wrote {topo.n} key pairs to {keys_dir} and their public keys to {args.topology}; keep *.key_secret private")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    from p2pfl.report import main

    return main(argv)
