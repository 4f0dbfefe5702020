"""Where a topology's peers run on a cluster: the file's hosts filled in from the machines a job got.

A topology written for a cluster may name placeholder hosts: ``@K`` is the K-th machine of the job
(counting from 0) and ``@`` any machine, the peers with host ``@`` going to the machines in
contiguous blocks of ids, as even as possible (``p2pfl-topology generate ring -n 64 --host @``).
Under SLURM the batch script fills the file once from the job's node list (``scontrol show
hostnames``) and every node then runs ``p2pfl-peer --id local`` on it (scripts/slurm/p2pfl.sbatch);
the Ray launcher fills every peer's host and port from where its actor landed (`fill`). Pure
functions on the file's document, so that what every peer digests (`net`, docs/wire.md) is the
filled file.

usage: python -m p2pfl.ops.placement TOPOLOGY --hosts-file FILE (- for stdin) [-o OUT]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from p2pfl.core.topology import TopologyError, parse
from p2pfl.ops.launch import spread


def is_placeholder(host: str) -> bool:
    return host.startswith("@")


def assign_hosts(peers: dict[int, str], machines: list[str]) -> dict[int, str]:
    """Peer id -> host, from each peer's host in the file: ``@K`` -> ``machines[K]``, ``@`` -> a
    contiguous block of the ``@`` peers per machine, any other host as it is."""
    if not machines:
        raise TopologyError("placement: the job's machine list is empty")
    out = {}
    for p, host in peers.items():
        if not is_placeholder(host):
            out[p] = host
        elif host != "@":
            k = host[1:]
            if not k.isdigit():
                raise TopologyError(f"placement: peer {p}: host {host!r} is not a placeholder (@ or @K, K a machine index)")
            if int(k) >= len(machines):
                raise TopologyError(f"placement: peer {p}: host {host!r} but the job has {len(machines)} machines ({', '.join(machines)})")
            out[p] = machines[int(k)]
    free = sorted(p for p, host in peers.items() if host == "@")
    for machine, block in zip(machines, spread(free, len(machines)) if free else [], strict=False):
        out.update(dict.fromkeys(block, machine))
    return out


def fill(doc: dict[str, Any], addresses: dict[int, tuple[str, int | None]]) -> dict[str, Any]:
    """A copy of topology document `doc` whose peers get these (host, port) pairs (port None: the
    file's), everything else as it was; checked as a topology, so a filled file that two peers
    would bind alike fails here, naming them."""
    out = copy.deepcopy(doc)
    for entry in out.get("peers") or []:
        if isinstance(entry, dict) and entry.get("id") in addresses:
            host, port = addresses[entry["id"]]
            entry["host"] = host
            if port is not None:
                entry["port"] = port
    text = yaml.safe_dump(out, sort_keys=False, default_flow_style=None)
    parse(text, "the filled topology")
    return out


def fill_hosts(text: str, machines: list[str], source: str) -> str:
    """The text of topology file `text` with its placeholder hosts filled from `machines`."""
    topo = parse(text, source)
    hosts = assign_hosts({p: s.host for p, s in topo.peers.items()}, machines)
    doc = fill(yaml.safe_load(text), {p: (h, None) for p, h in hosts.items()})
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pfl.ops.placement", description="Fill a topology's placeholder hosts (@, @K).")
    ap.add_argument("topology", type=Path)
    ap.add_argument("--hosts-file", required=True, help="the job's machines, one a line (scontrol show hostnames); - for stdin")
    ap.add_argument("-o", "--output", type=Path, help="where the filled file goes (default stdout)")
    args = ap.parse_args(argv)
    try:
        raw = sys.stdin.read() if args.hosts_file == "-" else Path(args.hosts_file).read_text()
        text = fill_hosts(args.topology.read_text(), [h.strip() for h in raw.splitlines() if h.strip()], str(args.topology))
    except (OSError, TopologyError) as e:
        print(f"placement: {e}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
