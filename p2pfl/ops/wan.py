"""`python -m p2pfl.ops.wan TOPOLOGY PROFILE.yaml --out ROUTED.yaml`: put a fault-injecting proxy
(`p2pfl.net.proxy`) on every edge of a topology and play a WAN profile on it until interrupted.
Peers started with ROUTED.yaml (same network id) dial each other through the proxy; co-hosted
peers talk in process, so give the launcher one process per peer (`--processes N`) to route every
edge (docs/wan.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import yaml

from p2pfl.core.topology import TopologyError
from p2pfl.host.files import dump_topology, load_topology
from p2pfl.net.ports import free_base_port
from p2pfl.net.proxy import Profile, ProxyError, play, route


def load_profile(path: Path) -> Profile:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProxyError(f"{path}: cannot read the WAN profile: {e}") from None
    return Profile.from_dict(doc, str(path))


async def serve(topology: Path, profile: Profile, out: Path, base_port: int, seed: int) -> None:
    topo = load_topology(topology)
    n_links = 2 * topo.graph.number_of_edges()
    routed, proxy = route(topo, base_port or free_base_port(n_links))
    await proxy.start()
    dump_topology(routed, out)
    print(f"wan: {n_links} directed links of {topology} proxied; peers use {out}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    player = asyncio.create_task(play(proxy, profile, seed))
    await stop.wait()
    player.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await player
    await proxy.close()
    resets = sum(link.resets for link in proxy.links.values())
    print(f"wan: stopped; {sum(link.bytes for link in proxy.links.values())} bytes relayed, {resets} connections reset", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pfl.ops.wan", description=__doc__.split("\n\n")[0])
    ap.add_argument("topology", type=Path)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="where to write the routed topology")
    ap.add_argument("--base-port", type=int, default=0, help="the proxy's first port (default: a free block)")
    ap.add_argument("--seed", type=int, default=0, help="draws of per-link delays and reset times")
    args = ap.parse_args(argv)
    try:
        asyncio.run(serve(args.topology, load_profile(args.profile), args.out, args.base_port, args.seed))
    except (ProxyError, TopologyError, OSError) as e:
        print(f"wan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
