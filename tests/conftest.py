"""Helpers for multi-process tests over real loopback TCP: a process per peer, or per block of co-hosted peers.

Test lanes: a test that starts peer processes does so through the `spawn` fixture and is marked
`slow` (collection fails otherwise); `make test-fast` runs the rest, `-m "not slow and not serial"`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

# Two xdist workers share the cores, and each test's peer processes share them too: torch's
# intra-op threads would only spin against each other (a trainer's round took 25x the CPU with
# two threads on this 2-core machine under load). Set before torch loads; children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from p2pfl.core import topology as T
from p2pfl.host.files import dump_topology, read_jsonl
from p2pfl.net import ports

ROOT = Path(__file__).resolve().parent.parent


def free_base_port(n: int) -> int:
    """`p2pfl.net.ports.free_base_port` in this pytest-xdist worker's own slice of the port range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1:
        return ports.free_base_port(n, int(worker[2:]), count)
    return ports.free_base_port(n)


def wait_until(ready: Callable[[], object], timeout: float, what: str, procs: Iterable[subprocess.Popen] = (),
               every: float = 0.1) -> None:
    """Poll `ready()` every `every` seconds until it is true; fail naming `what` after `timeout`
    seconds, or at once, with their exit codes, if one of `procs` has exited."""
    procs = list(procs)
    end = time.monotonic() + timeout
    while not ready():
        codes = [pr.poll() for pr in procs]
        assert all(c is None for c in codes), f"{what}: a process exited first ({codes})"
        assert time.monotonic() < end, f"{what}: not within {timeout:g} s"
        time.sleep(every)


def records(run_dir: Path, peer: int) -> list[dict]:
    """Peer `peer`'s metrics records so far (none before its first round)."""
    f = run_dir / "metrics" / f"peer-{peer}.jsonl"
    return read_jsonl(f) if f.exists() else []


def make_topology(tmp: Path, kind: str, n: int, **params) -> tuple[T.Topology, Path]:
    topo = T.generate(kind, n, base_port=free_base_port(n), **params)
    path = tmp / f"{kind}-{n}.yaml"
    dump_topology(topo, path)
    return topo, path


class Spawner:
    """Starts peer processes for one test and owns them: whatever still runs when the test ends,
    passed or failed, is killed with its whole process group."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def __call__(self, topo_path: Path, peer: int | str, run_dir: Path, *args: str) -> subprocess.Popen:
        """One peer process (or, with a `--id` list or range as `peer`, a process of co-hosted peers),
        in a process group of its own; its output goes to RUN_DIR/stdout-<peer>.log."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(run_dir / f"stdout-{peer}.log", "ab") as log:  # the child keeps its own handle
            pr = subprocess.Popen(
                [sys.executable, "-m", "p2pfl", "--topology", str(topo_path), "--id", str(peer), "--run-dir", str(run_dir), *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
            )
        self.started.append(pr)
        return pr

    def kill_all(self) -> None:
        for pr in self.started:
            if pr.poll() is None:  # not reaped yet, so its group id is still its own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGKILL)
            pr.wait()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread in every test (see OMP_NUM_THREADS above), whatever an earlier test set."""
    torch.set_num_threads(1)


@pytest.fixture
def spawn():
    """`spawn(topology, peer, run_dir, *args)` starts a peer; teardown kills every one still running."""
    spawner = Spawner()
    yield spawner
    spawner.kill_all()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast lane must not start peer processes: every test that uses `spawn` is marked `slow`."""
    unmarked = [it.nodeid for it in items if "spawn" in getattr(it, "fixturenames", ()) and it.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that start peer processes (the spawn fixture) must be marked slow: " + ", ".join(unmarked))


def run_layout(spawn: Spawner, path: Path, run_dir: Path, blocks: list[str], *args: str, timeout: float = 400,
               late: tuple[str, float] | None = None) -> None:
    """One process per block of peer ids, all to exit 0 within `timeout` seconds. `late` =
    (block, seconds): that block starts that long after the others have started their peers."""
    run_dir.mkdir(parents=True)
    procs: dict[str, subprocess.Popen] = {}
    for ids in sorted(blocks, key=lambda b: late is not None and b == late[0]):
        if late is not None and ids == late[0]:
            wait_until(lambda: all(b"run dir" in (run_dir / f"stdout-{b}.log").read_bytes() for b in procs), 120,
                       f"the start of blocks {list(procs)}", procs.values())
            time.sleep(late[1])
        procs[ids] = spawn(path, ids, run_dir, *args)
    codes = wait_all(procs, timeout)
    assert codes == {b: 0 for b in blocks}, [(run_dir / f"stdout-{b}.log").read_text()[-2000:] for b in blocks]


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
