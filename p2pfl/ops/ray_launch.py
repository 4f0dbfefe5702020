"""The launcher on a Ray cluster (`scripts/launch.sh TOPOLOGY --ray [ADDRESS]`).

One actor per node (or per GPU, or per `--peers-per-actor` peers) hosts a contiguous block of the
topology's peers through the daemon's `Host`, as one `p2pfl-peer --id A-B` process would: its
peers share one torch and one frozen model, and actors do not each load one per peer (Flower's
one-actor-per-client runs out of memory from about 50 clients on). The file's addresses are filled
in from where the actors landed (its hosts may be placeholders), every peer gets the filled file,
and peers talk ZeroMQ over TCP as anywhere else: Ray carries only control (where an actor landed,
progress, stop) and the run's files at the end. Each actor writes its peers' run-dir files on its
own node; the launcher gathers them into one local run directory, so the summary, the report and
`--resume` are the local launcher's. Ray restarts a dead actor (`--max-restarts`) on the same
addresses; its peers resume from their checkpoints, or start from a neighbour's exact model.

Ray is an optional extra (`pip install -e '.[ray]'`), imported only inside these functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from p2pfl.config import peer_trainers
from p2pfl.core import topology as topo_mod
from p2pfl.errors import P2pflError
from p2pfl.net.ports import hold_block
from p2pfl.ops.launch import finish, id_spec, last_records, progress_line, spread
from p2pfl.ops.placement import fill

PLACE_TIMEOUT = 300.0  # seconds for every actor to start: past it the cluster lacks what the actors ask for


def add_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("Ray cluster (pip install -e '.[ray]'; docs/operations.md#cluster)")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run the peers on the Ray cluster at ADDRESS "
                   "(host:port, or auto); with no address, on a local Ray instance")
    g.add_argument("--actors", type=int, help="actors to spread the peers over (default: one per node, or one per GPU "
                   "when the peers' device is auto or cuda)")
    g.add_argument("--peers-per-actor", type=int, help="peers each actor hosts, instead of --actors")
    g.add_argument("--actor-cpus", type=float, help="CPUs each actor asks Ray for, and its training threads "
                   "(default: the smallest node's CPUs, shared among the actors a node gets)")
    g.add_argument("--actor-gpus", type=float, help="GPUs each actor asks Ray for (default 1 when the peers' device "
                   "is auto or cuda and the cluster has GPUs, else 0)")
    g.add_argument("--max-restarts", type=int, default=3, help="times Ray restarts a dead actor (default 3)")
    g.add_argument("--node-dir", help="where actors write their peers' files on their nodes (default <tmp>/p2pfl-ray/<run>)")


def peer_files(run_dir: Path, peer: int) -> dict[str, bytes]:
    """A peer's run-dir files (records, log, adapter, checkpoints) by path relative to `run_dir`."""
    paths = [run_dir / "metrics" / f"peer-{peer}.jsonl", run_dir / "logs" / f"peer-{peer}.log",
             *sorted((run_dir / f"peer-{peer}").rglob("*"))]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in paths if f.is_file()}


def put_files(run_dir: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = (run_dir / rel).resolve()
        if not path.is_relative_to(run_dir.resolve()):
            raise P2pflError(f"ray launch: file {rel!r} is outside the run directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class PeerActor:
    """A block of peers on one Ray node: the daemon's `Host` in a thread of this actor's process
    (Ray runs `records` and `stop` beside `run`), its run-dir files under `run_dir` on the node."""

    def __init__(self, ids: list[int], run_dir: str) -> None:
        self.ids, self.run_dir = ids, Path(run_dir)
        self.held: list[socket.socket] = []
        self.host: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    def place(self) -> dict[str, Any]:
        """Where this actor landed: its node's address, a port per peer (held), its process id."""
        import ray

        self.held = hold_block(len(self.ids), host="")  # on every address, until the peers bind: actors side by side never pick the same
        return {"host": ray.util.get_node_ip_address(), "ports": [s.getsockname()[1] for s in self.held], "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def run(self, topology: str, argv: list[str], files: dict[str, bytes]) -> int:
        """Host this block's peers of `topology` (text) with peer flags `argv` until they finish;
        `files` (a resumed run's, by relative path) are put in the run dir first."""
        import ray

        from p2pfl.host.daemon import run_peers
        from p2pfl.host.files import load_topology
        from p2pfl.host.logs import setup_logging
        from p2pfl.ops.cli import build_peer_config

        self.run_dir.mkdir(parents=True, exist_ok=True)
        put_files(self.run_dir, files)
        path = self.run_dir / "topology.yaml"
        path.write_text(topology)
        cfg, args, ids, _ = build_peer_config(["--topology", str(path), "--run-dir", str(self.run_dir), *argv, "--id", id_spec(self.ids)])
        here = ray.util.get_node_ip_address()
        topo = load_topology(path)
        moved = {p: h for p in ids if (h := topo.peers[p].host) != here}
        if moved:  # restarted on another node (its node was lost): every peer digests the addresses (`net`), so they cannot move
            raise P2pflError(f"ray launch: peers {sorted(moved)} are at {set(moved.values())} but this actor is on {here}")
        setup_logging(self.run_dir, ids, args.log_level)
        process_log = logging.FileHandler(self.run_dir / "logs" / f"process-{ids[0]}.stdout")
        process_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(process_log)
        for s in self.held:
            s.close()
        self.held = []
        return run_peers(cfg, ids, started=self._started)

    def _started(self, host: Any) -> None:
        self.host, self.loop = host, asyncio.get_running_loop()
        if self.stopping:
            host.request_stop()

    def records(self) -> dict[int, dict[str, Any]]:
        return last_records(self.run_dir, self.ids)

    def stop(self) -> None:
        """Stop as SIGTERM stops a peer process: finish the round, checkpoint, say goodbye."""
        self.stopping = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.host.request_stop)

    def clean(self) -> None:
        """Delete this actor's files on its node, once the launcher has them all."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the run's folder on this node, once its last actor is done
            self.run_dir.parent.rmdir()

    def files(self, peer: int) -> dict[str, bytes]:
        out = peer_files(self.run_dir, peer)
        if peer == self.ids[0] and (log := self.run_dir / "logs" / f"process-{peer}.stdout").is_file():
            out[str(log.relative_to(self.run_dir))] = log.read_bytes()
        return out


def wants_gpu(topology: Path, topo: topo_mod.Topology, extra: list[str]) -> bool:
    """Whether the peer flags are valid (else P2pflError, before Ray starts) and put any peer on a GPU."""
    from p2pfl.ops.cli import build_peer_config

    cfg, _, _, _ = build_peer_config(["--topology", str(topology), *extra, "--id", id_spec(topo.ids)])
    trainers = peer_trainers(cfg, {p: s.extra for p, s in topo.peers.items()}, str(topology))
    return not cfg.no_train and any(str(t.get("device", "cpu")) != "cpu" for t in trainers.values())


def layout(args: argparse.Namespace, n: int, nodes: list[dict[str, Any]], gpus_total: float, gpu: bool) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) from the options and the cluster's nodes."""
    gpus = args.actor_gpus if args.actor_gpus is not None else (1.0 if gpu and gpus_total >= 1 else 0.0)
    if args.actors:
        count = args.actors
    elif args.peers_per_actor:
        count = math.ceil(n / args.peers_per_actor)
    else:
        count = int(gpus_total // gpus) if gpus else len(nodes)
    count = max(1, min(count, n))
    share = math.ceil(count / max(1, len(nodes)))
    cpus = args.actor_cpus or max(1.0, float(min(nd["Resources"].get("CPU", 1.0) for nd in nodes) // share))
    return count, cpus, gpus


def run(args: argparse.Namespace, topo: topo_mod.Topology, run_dir: Path, extra: list[str]) -> int:
    for name in ("actors", "peers_per_actor", "actor_cpus"):
        if (v := getattr(args, name)) is not None and v <= 0:
            print(f"launch: --{name.replace('_', '-')} must be > 0, got {v}", file=sys.stderr)
            return 2
    try:
        gpu = wants_gpu(args.topology, topo, extra)
    except P2pflError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    try:
        import ray
    except ImportError:
        print("launch: --ray needs Ray: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    local = {"include_dashboard": False} if args.ray == "local" else {}  # a cluster's head has its own settings
    ray.init(address=None if args.ray == "local" else args.ray, log_to_driver=False, logging_level=logging.WARNING, **local)
    try:
        return _run(ray, args, topo, run_dir, extra, gpu)
    finally:
        ray.shutdown()


def _run(ray: Any, args: argparse.Namespace, topo: topo_mod.Topology, run_dir: Path, extra: list[str], gpu: bool) -> int:
    placed = _place(ray, args, topo, run_dir, gpu)
    if placed is None:
        return 1
    actors, blocks, text, cpus = placed
    argv = ["--threads", str(max(1, int(cpus))), *(["--rounds", str(args.rounds)] if args.rounds is not None else []), *extra]
    keys = args.topology.parent / "keys"

    def files(k: int) -> dict[str, bytes]:
        """What actor k needs from here: a resumed run's files of its peers, and their secret keys."""
        out: dict[str, bytes] = {}
        for p in blocks[k]:
            if "--resume" in extra:
                out.update(peer_files(run_dir, p))
            if (key := keys / f"peer-{p}.key_secret").is_file():
                out[f"keys/{key.name}"] = key.read_bytes()
        return out

    refs = {k: a.run.remote(text, argv, files(k)) for k, a in enumerate(actors)}
    codes = _watch(ray, args, actors, blocks, refs, lambda k: actors[k].run.remote(text, [*argv, "--resume"], {}), topo.ids)
    _gather(ray, actors, blocks, run_dir)
    return finish(run_dir, topo.ids, {p: codes[k] for k, b in enumerate(blocks) for p in b}, not args.no_report)


def _place(ray: Any, args: argparse.Namespace, topo: topo_mod.Topology, run_dir: Path,
           gpu: bool) -> tuple[list[Any], list[list[int]], str, float] | None:
    """The actors, started and placed; their blocks of ids; the filled topology's text (also
    written to the run dir); CPUs per actor. None when the cluster has no room for them."""
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    nodes = [nd for nd in ray.nodes() if nd["Alive"]]
    count, cpus, gpus = layout(args, topo.n, nodes, ray.cluster_resources().get("GPU", 0.0), gpu)
    blocks = spread(topo.ids, count)
    node_dir = Path(args.node_dir or Path(tempfile.gettempdir()) / "p2pfl-ray" / f"{run_dir.name}-{uuid.uuid4().hex[:8]}")
    print(f"launch: {topo.n} peers of {args.topology} on Ray ({len(nodes)} nodes) in {count} actors of {cpus:g} CPU, "
          f"{gpus:g} GPU -> {run_dir} (peers' files on the nodes under {node_dir})", flush=True)
    # A bundle per actor, spread over the nodes: a restarted actor comes back in its bundle, on its node.
    group = placement_group([{"CPU": cpus, **({"GPU": gpus} if gpus else {})}] * count, strategy="SPREAD")
    try:
        ray.get(group.ready(), timeout=PLACE_TIMEOUT)
    except GetTimeoutError:
        print(f"launch: no room within {PLACE_TIMEOUT:g} s: the cluster lacks {cpus:g} CPU and {gpus:g} GPU for each of "
              f"{count} actors (see --actors, --actor-cpus, --actor-gpus)", file=sys.stderr)
        return None
    actors = [ray.remote(PeerActor).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=args.max_restarts, max_concurrency=4,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=k),
    ).remote(b, str(node_dir / f"actor-{k}")) for k, b in enumerate(blocks)]
    where = []
    for k, a in enumerate(actors):  # one after the other: an actor holds its ports before the next picks
        where.append(ray.get(a.place.remote(), timeout=PLACE_TIMEOUT))
        print(f"launch: actor {k}: peers {id_spec(blocks[k])} on {where[k]['host']} node {where[k]['node'][:8]} "
              f"(pid {where[k]['pid']})", flush=True)
    doc = yaml.safe_load(args.topology.read_text())
    filled = fill(doc, {p: (w["host"], w["ports"][i]) for b, w in zip(blocks, where, strict=True) for i, p in enumerate(b)})
    text = yaml.safe_dump(filled, sort_keys=False, default_flow_style=None)
    (run_dir / "topology.yaml").write_text(text)  # the file the peers ran: the report's and a resumed run's
    return actors, blocks, text, cpus


def _watch(ray: Any, args: argparse.Namespace, actors: list[Any], blocks: list[list[int]], refs: dict[int, Any],
           restart: Callable[[int], Any], ids: list[int]) -> dict[int, int]:
    """Progress lines until every actor's run has ended; Ctrl-C stops the actors (a second kills
    them); an actor that died is run again by `restart(k)` once Ray has restarted it. Exit codes by actor."""
    from ray.exceptions import RayActorError, RayTaskError

    codes: dict[int, int] = {}
    restarts = dict.fromkeys(refs, 0)
    down: set[int] = set()  # restarted actors whose peers have not answered since
    stopping = {"n": 0}

    def forward(sig: int, _frame: Any) -> None:
        stopping["n"] += 1
        print(f"\nlaunch: {'stopping' if stopping['n'] == 1 else 'killing'} every actor", flush=True)
        for a in actors:
            if stopping["n"] == 1:
                a.stop.remote()
            else:
                ray.kill(a, no_restart=True)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    latest: dict[int, dict[str, Any]] = {}
    last_line = ""
    while refs:
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=1.0)
        for k in [k for k, r in refs.items() if r in done]:
            what = f"actor {k} (peers {id_spec(blocks[k])})"
            try:
                codes[k] = ray.get(refs.pop(k))
            except RayActorError as e:
                if restarts[k] < args.max_restarts and not stopping["n"]:
                    restarts[k] += 1
                    print(f"launch: {what} died; Ray restarts it ({restarts[k]} of {args.max_restarts}) and its peers resume", flush=True)
                    refs[k] = restart(k)
                    down.add(k)
                else:
                    print(f"launch: {what} is lost: {e}", file=sys.stderr)
                    codes[k] = 1
            except RayTaskError as e:
                print(f"launch: {what} failed: {e}", file=sys.stderr)
                codes[k] = 1
        asked = {k: actors[k].records.remote() for k in refs}
        answered, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=1.0) if asked else ([], [])
        for k, r in asked.items():
            if r in answered:
                try:
                    latest.update(ray.get(r))
                    down.discard(k)
                except RayActorError:
                    down.add(k)
        line = progress_line(latest, ids, sum(len(blocks[k]) for k in refs if k not in down))
        if line != last_line:
            print(line, flush=True)
            last_line = line
    return codes


def _gather(ray: Any, actors: list[Any], blocks: list[list[int]], run_dir: Path) -> None:
    """Every peer's files from its node into the local run dir, one peer at a time (a bounded
    share of Ray's object store); an actor whose files all came deletes its copy."""
    from ray.exceptions import GetTimeoutError, RayActorError

    for k, a in enumerate(actors):
        try:
            for p in blocks[k]:
                put_files(run_dir, ray.get(a.files.remote(p), timeout=PLACE_TIMEOUT))
            ray.get(a.clean.remote(), timeout=PLACE_TIMEOUT)
        except (RayActorError, GetTimeoutError) as e:
            print(f"launch: the files of peers {id_spec(blocks[k])} stay on their node: {type(e).__name__}", file=sys.stderr)
