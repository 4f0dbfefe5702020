"""Helpers for multi-process tests over real loopback TCP: a process per peer, or per block of co-hosted peers."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pfl.core import topology as T
from p2pfl.host.files import dump_topology

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_range(n: int) -> tuple[int, int]:
    """Where base ports are drawn: 10000 up to the ephemeral range, split into disjoint slices
    when pytest-xdist runs workers side by side, so that no two workers draw the same ports."""
    low, high = 10000, _ephemeral_low() - n - 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1:
        span = (high - low) // count
        low += int(worker[2:]) * span
        high = low + span - n
    return low, high


_HANDED: list[range] = []  # blocks this worker handed out: an earlier test's peers may still retry them


def free_base_port(n: int) -> int:
    """A base port with n consecutive free TCP ports on 127.0.0.1, below the ephemeral range: the
    kernel hands ephemeral ports to outgoing connections (every peer's DEALERs), which could
    otherwise take a port between this check and a later peer's bind. No port is handed out twice
    in a worker, so no test's peers ever listen where an earlier test's peers connected."""
    low, high = _port_range(n)
    for _ in range(200):
        base = random.randint(low, high)
        if any(base < r.stop and r.start < base + n for r in _HANDED):
            continue
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k))
                socks.append(s)
            _HANDED.append(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def make_topology(tmp: Path, kind: str, n: int, **params) -> tuple[T.Topology, Path]:
    topo = T.generate(kind, n, base_port=free_base_port(n), **params)
    path = tmp / f"{kind}-{n}.yaml"
    dump_topology(topo, path)
    return topo, path


def start_peer(topo_path: Path, peer: int | str, run_dir: Path, *args: str) -> subprocess.Popen:
    """One peer process (or, with a `--id` list or range as `peer`, a process of co-hosted peers), in
    a process group of its own (see `spawn`); its output goes to RUN_DIR/stdout-<peer>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(run_dir / f"stdout-{peer}.log", "ab") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "p2pfl", "--topology", str(topo_path), "--id", str(peer), "--run-dir", str(run_dir), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
        )


class Spawner:
    """Starts peer processes for one test (as `start_peer`) and owns them: whatever still runs
    when the test ends, passed or failed, is killed with its whole process group."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def __call__(self, topo_path: Path, peer: int | str, run_dir: Path, *args: str) -> subprocess.Popen:
        pr = start_peer(topo_path, peer, run_dir, *args)
        self.started.append(pr)
        return pr

    def kill_all(self) -> None:
        for pr in self.started:
            if pr.poll() is None:  # not reaped yet, so its group id is still its own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGKILL)
            pr.wait()


@pytest.fixture(scope="module")
def one_thread():
    """Many small engines or trainers in one process: intra-op threads only contend on small tensors."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def spawn():
    """`spawn(topology, peer, run_dir, *args)` starts a peer; teardown kills every one still running."""
    spawner = Spawner()
    yield spawner
    spawner.kill_all()


def wait_all(procs: dict[int, subprocess.Popen], timeout: float) -> dict[int, int]:
    end = time.monotonic() + timeout
    codes = {}
    for p, pr in procs.items():
        try:
            codes[p] = pr.wait(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"peer {p} did not finish within {timeout}s") from None
    return codes


@pytest.fixture
def cluster_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    yield d
    # Show the tail of failing peers' output in the pytest report.
    for f in sorted(d.glob("stdout-*.log")):
        text = f.read_text(errors="replace")
        if "Traceback" in text:
            print(f"--- {f.name}\n{text[-3000:]}")
