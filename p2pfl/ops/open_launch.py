"""An open network on this machine: `scripts/launch.sh --open N` makes an authority, a network
file whose one bootstrap peer is peer 0, a certificate and key pair per peer, and starts the peers
in P processes (co-hosted peers listen on consecutive ports); every peer but 0 knows only peer 0's
address and joins through it. `scripts/launch.sh --join RUN_DIR` adds a site to a running one:
the next free ids, certified by the same authority, joining through the bootstrap peer. Both show
the same progress line, summary and report as a topology's run (`p2pfl.ops.launch`).

Run directory: ``authority/`` (its key, ledger), ``network.yaml``, ``certs/`` (a certificate file
per process, ``keys/`` beside it), ``revocations.txt`` (every peer watches it: append a
revocation with `p2pfl-topology authority revoke --dir RUN_DIR/authority ID -o RUN_DIR/revocations.txt`),
``metrics/``, ``logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from p2pfl.host.files import load_network, read_jsonl
from p2pfl.net.ports import free_base_port
from p2pfl.ops import authority
from p2pfl.ops.launch import finish, follow, spread

NAME = "local"


def certify(run_dir: Path, ids: list[int], tag: str) -> Path:
    """One certificate file for `ids` (one line each), their key pairs beside it; peer 0's
    certificate (made with the network) comes first where `ids` holds it."""
    out = run_dir / "certs" / f"{tag}.cert"
    out.parent.mkdir(parents=True, exist_ok=True)
    name = load_network(run_dir / "network.yaml").name
    out.write_text((run_dir / "certs" / "bootstrap.cert").read_text() if 0 in ids else "")
    for p in ids:
        if p != 0:
            authority.certify(run_dir / "authority", name, p, out, append=True)
    return out


def create(run_dir: Path, settings: dict[str, Any], host: str, ports: int, membership: dict[str, Any] | None = None) -> int:
    """Authority and network file of a new open network in `run_dir` (`membership`: its view
    protocol's parameters), and the bootstrap peer's (peer 0's) certificate and key pair; the
    first of `ports` free ports, peer 0's."""
    with contextlib.redirect_stdout(io.StringIO()):
        authority.init(run_dir / "authority")
    port = free_base_port(ports, host)
    certs = run_dir / "certs" / "bootstrap.cert"
    certs.parent.mkdir(parents=True, exist_ok=True)
    public = (run_dir / "authority" / authority.PUBLIC).read_text().strip()
    keys = run_dir / "certs" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    import zmq.auth

    public_file, secret_file = zmq.auth.create_certificates(str(keys), "peer-0")
    os.chmod(secret_file, 0o600)
    key = zmq.auth.load_certificate(public_file)[0].decode()
    doc = {"name": NAME, "authority": public, "bootstrap": [{"id": 0, "host": host, "port": port, "public_key": key}],
           "settings": {"no_train": True, **settings}, **({"membership": membership} if membership else {})}
    (run_dir / "network.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    authority.certify(run_dir / "authority", NAME, 0, certs, public_key=key)
    (run_dir / "revocations.txt").touch()
    return port


def start(run_dir: Path, ids: list[int], cert: Path, host: str, extra: list[str], port: int | None = None,
          revocations: bool = True) -> subprocess.Popen[bytes]:
    """A process hosting `ids` (their certificates in `cert`), listening from `port` on (default:
    a free block of ports); `revocations`: it watches RUN_DIR/revocations.txt."""
    port = port or free_base_port(len(ids), host)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "logs" / f"process-{ids[0]}.stdout", "wb") as out:  # the child keeps its own handle
        watch = ["--revocations", str(run_dir / "revocations.txt")] if revocations else []
        return subprocess.Popen([sys.executable, "-m", "p2pfl", "--network", str(run_dir / "network.yaml"), "--cert", str(cert),
                                 "--listen", f"{host}:{port}", "--run-dir", str(run_dir), *watch, *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def next_ids(run_dir: Path, count: int) -> list[int]:
    """The `count` ids after every id the authority has certified."""
    first = max((r["peer"] for r in read_jsonl(run_dir / "authority" / authority.LEDGER)), default=-1) + 1
    return list(range(first, first + count))


def watch(run_dir: Path, procs: dict[int, subprocess.Popen[bytes]], blocks: dict[int, list[int]], report: bool) -> int:
    """Progress until every process exits, then the summary (and report) of these processes' peers."""
    follow(run_dir, procs, blocks)
    return finish(run_dir, sorted(p for b in blocks.values() for p in b), {p: procs[k].returncode for k, b in blocks.items() for p in b}, report)


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1 :]
    ap = argparse.ArgumentParser(prog="scripts/launch.sh", description="Run an open network on this machine, or add a site to one.")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--open", type=int, metavar="N", help="start a new open network of N peers joining through peer 0")
    how.add_argument("--join", type=Path, metavar="RUN_DIR", help="add peers to the open network running in RUN_DIR")
    ap.add_argument("--count", type=int, default=1, help="with --join: how many peers the new site hosts (default 1)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--processes", type=int, help="processes to spread the peers over (default: one per core)")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    n = args.open if args.open is not None else args.count
    if n < 1 or (args.processes is not None and args.processes < 1):
        print("launch: N, --count and --processes must be >= 1", file=sys.stderr)
        return 2
    host = "127.0.0.1"
    if args.join is not None:
        run_dir = args.join
        if not (run_dir / "network.yaml").is_file():
            print(f"launch: {run_dir} holds no network.yaml (start one with --open N)", file=sys.stderr)
            return 2
        with open(run_dir / "authority" / ".lock", "w") as lock:  # two sites added at once take different ids
            fcntl.flock(lock, fcntl.LOCK_EX)
            ids = next_ids(run_dir, n)
            cert = certify(run_dir, ids, f"site-{ids[0]}")
        extra = (["--rounds", str(args.rounds)] if args.rounds is not None else []) + extra
        proc = start(run_dir, ids, cert, host, extra)
        print(f"launch: site of peers {ids} joins the network of {run_dir} through its bootstrap peer", flush=True)
        return watch(run_dir, {ids[0]: proc}, {ids[0]: ids}, False)
    run_dir = args.run_dir or Path("runs") / time.strftime("open-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    blocks = spread(list(range(n)), args.processes or os.cpu_count() or 1)
    port = create(run_dir, {"rounds": args.rounds} if args.rounds is not None else {}, host, len(blocks[0]))
    procs: dict[int, subprocess.Popen[bytes]] = {}
    for k, block in enumerate(blocks):
        procs[block[0]] = start(run_dir, block, certify(run_dir, block, f"process-{k}"), host, extra, port if k == 0 else None)
        if k == 0:
            time.sleep(0.5)  # the bootstrap peer binds first; the others' JOINs are retried anyway
    print(f"launch: open network of {n} peers in {len(blocks)} processes -> {run_dir}; add a site with "
          f"scripts/launch.sh --join {run_dir}", flush=True)
    return watch(run_dir, procs, {b[0]: b for b in blocks}, not args.no_report)
