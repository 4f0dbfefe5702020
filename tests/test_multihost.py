"""Peers on different hosts from one topology file, emulated with Linux network namespaces.

Three namespaces (one "host" per peer, each with its own network stack and address 10.99.X.1..3)
hang off a bridge that lives in a fourth, hub namespace, so the root namespace is never touched
and every address the peers use belongs to namespaces this test created. Each peer runs with
`ip netns exec NS python -m p2pfl`; all of them use the same port number, which is only
possible because they really are on different hosts. The topology carries CurveZMQ keys, so the
cross-host traffic is encrypted and authenticated as well. Everything is deleted afterwards
(deleting a namespace deletes its veth ends and the bridge), also when the test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from p2pfl.core.consensus import exact_distance, network_mean
from p2pfl.core.state import synthetic_state
from p2pfl.host.checkpoint import load_state
from p2pfl.host.files import load_topology, read_jsonl
from p2pfl.ops.cli import topology_main

from .conftest import ROOT, wait_all

N = 3
PORT = 29555
DIM = 4096
ROUNDS = 15


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _permission_denied(err: str) -> bool:
    return any(s in err for s in ("Operation not permitted", "Permission denied", "must be root"))


def _probe_netns() -> None:
    """Skip (the only allowed skip) when this machine does not let us create network namespaces."""
    name = f"p2pfl-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        r = ip("netns", "add", name, check=False)
    except FileNotFoundError:
        pytest.skip("the `ip` tool (iproute2) is not installed")
    try:
        if r.returncode != 0:
            if _permission_denied(r.stderr):
                pytest.skip(f"creating network namespaces is not permitted here: {r.stderr.strip()}")
            raise AssertionError(f"ip netns add failed: {r.stderr.strip()}")
        r = ip("netns", "exec", name, "true", check=False)
        if r.returncode != 0 and _permission_denied(r.stderr):
            pytest.skip(f"entering network namespaces is not permitted here: {r.stderr.strip()}")
    finally:
        ip("netns", "del", name, check=False)


@pytest.fixture
def hosts() -> Iterator[tuple[list[str], list[str]]]:
    """Three namespaces on a bridge: (namespace names, their addresses). Torn down afterwards."""
    _probe_netns()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subnet = 10 + os.getpid() % 240
    hub = f"p2pfl-hub-{tag}"
    spaces = [f"p2pfl-h{k}-{tag}" for k in range(N)]
    addrs = [f"10.99.{subnet}.{k + 1}" for k in range(N)]
    created: list[str] = []
    try:
        for ns in (hub, *spaces):
            ip("netns", "add", ns)
            created.append(ns)
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "link", "set", "br0", "up")
        for k, (ns, addr) in enumerate(zip(spaces, addrs, strict=True)):
            ip("-n", hub, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", hub, "link", "set", f"v{k}", "master", "br0")
            ip("-n", hub, "link", "set", f"v{k}", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield spaces, addrs
    finally:
        for ns in reversed(created):
            ip("netns", "del", ns, check=False)
        left = ip("netns", "list", check=False).stdout
        assert tag not in left, f"namespaces left behind: {left}"


@pytest.mark.slow
def test_peers_on_three_hosts_reach_consensus(tmp_path: Path, cluster_dir: Path, hosts: tuple[list[str], list[str]]) -> None:
    spaces, addrs = hosts
    path = tmp_path / "hosts.yaml"
    doc = {
        "name": "three-hosts",
        "peers": [{"id": k, "host": addrs[k], "port": PORT} for k in range(N)],  # one port, three hosts
        "edges": [[0, 1], [0, 2], [1, 2]],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert topology_main(["keygen", "--topology", str(path)]) == 0
    topo = load_topology(path)
    assert {topo.peers[k].endpoint for k in topo.ids} == {f"tcp://{a}:{PORT}" for a in addrs}

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--rounds", str(ROUNDS), "--no-train", "--dim", str(DIM), "--min-wait", "60", "--peer-timeout", "60"]
    procs: dict[int, subprocess.Popen] = {}
    try:
        for k, ns in enumerate(spaces):
            out = open(cluster_dir / f"stdout-{k}.log", "ab")  # noqa: SIM115 - the child owns it
            procs[k] = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "p2pfl", "--topology", str(path),
                 "--id", str(k), "--run-dir", str(cluster_dir), *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )
        codes = wait_all(procs, timeout=300)
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                pr.kill()
                pr.wait()
    assert codes == {k: 0 for k in range(N)}, codes

    x0 = [synthetic_state(0, k, DIM) for k in range(N)]
    xt = [load_state(cluster_dir / f"peer-{k}" / "adapter.safetensors") for k in range(N)]
    d0, dt = exact_distance(x0), exact_distance(xt)
    m0, mt = network_mean(x0), network_mean(xt)
    print(f"three hosts {addrs}: consensus distance {d0:.4g} -> {dt:.3g}, mean drift {float((mt - m0).norm() / m0.norm()):.2e}")
    # Triangle with Metropolis-Hastings weights: W = 11'/3, exact averaging in one round.
    assert dt < 1e-5 * d0
    assert float((mt - m0).norm() / m0.norm()) < 1e-5
    for k in range(N):
        recs = read_jsonl(cluster_dir / "metrics" / f"peer-{k}.jsonl")
        assert [r["round"] for r in recs] == list(range(ROUNDS))
        assert recs[-1]["live_neighbors"] == 2
        assert recs[-1]["rejected_messages"] == 0
        assert recs[-1]["consensus_peers"] == N
        assert sum(r["bytes_received"] for r in recs) >= ROUNDS * 2 * 4 * DIM
        log = (cluster_dir / "logs" / f"peer-{k}.log").read_text()
        assert "NO ENCRYPTION" not in log
        assert all(f"neighbour {j} is up" in log for j in range(N) if j != k)
